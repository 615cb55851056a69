"""Edge bundles: export -> serve in a separate process -> infer -> durable usage -> upload billed once;
tampered, corrupt, wrong-version and wrong-target bundles refused with a clear message."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from runtime.lite.bundle import BundleError, _meta_digest, export_bundle, open_bundle
from runtime.lite.edge import SENT, USAGE, UsageSpool, upload_once
from tests.conftest import example, free_port, oip_body, outputs_of, wait_for
from tests.lite_support import REPO, needs_lite, prepare, process

pytestmark = needs_lite
DEVICE_KEY = "edge-device-key-0123456789abcdef"


@pytest.fixture(scope="module")
def prepared_mlp(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "mlp"
    assert prepare(models["mlp"], out)["lite"]["available"]
    return out


@pytest.fixture
def bundle(prepared_mlp, tmp_path) -> Path:
    path = tmp_path / "bundle.tar.gz"
    export_bundle(prepared_mlp, path, device_key=DEVICE_KEY, bundle_id="b-test-1", model_name="mlp")
    return path


class FakePlatform:
    """Stands in for the platform's ``POST /v1/edge/usage``: answers the statuses given, then 200; counts each
    request id once, as the real endpoint must."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.posts: list[tuple[int, str, dict]] = []  # (status answered, authorization, body)
        self.billed: dict[str, dict] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                status = fake.statuses.pop(0) if fake.statuses else 200
                fake.posts.append((status, self.headers.get("authorization", ""), body))
                if status == 200 and self.path == "/v1/edge/usage":
                    for record in body["records"]:
                        fake.billed.setdefault(record["request_id"], record)
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def fake_platform() -> Iterator[FakePlatform]:
    fake = FakePlatform([503])  # the first upload attempt fails: nothing may be marked sent by it
    yield fake
    fake.close()


def edge_serve(bundle: Path, data_dir: Path, port: int, log: Path, *extra: str):  # type: ignore[no-untyped-def]
    args = ["-m", "runtime.lite.edge", "serve", str(bundle), "--port", str(port), "--host", "127.0.0.1",
            "--data-dir", str(data_dir), *extra]  # fmt: skip
    return process(args, log, f"http://127.0.0.1:{port}/v2/health/ready")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_export_serve_infer_record_and_upload_billed_once(bundle, models, fake_platform, tmp_path):
    data = tmp_path / "edge-data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    inputs, expected = example(models["mlp"])
    upload = ("--platform", fake_platform.url, "--upload-interval", "0.2")
    with edge_serve(bundle, data, port, tmp_path / "edge1.log", *upload), httpx.Client(base_url=url) as c:
        ids = []
        for _ in range(3):
            r = c.post("/v2/models/mlp/infer", json=oip_body(inputs), timeout=30)
            assert r.status_code == 200, r.text
            assert r.headers["x-paddlefn-engine"] == "paddle-lite"
            assert r.json()["parameters"]["engine"] == "paddle-lite"
            for name, want in expected.items():
                assert abs(outputs_of(r.json())[name] - want).max() < 1e-4
            # fsync happens before the response: the record is on disk by the time the client has the answer.
            request_id = r.headers["x-paddlefn-request-id"]
            assert request_id in {rec["request_id"] for rec in read_jsonl(data / USAGE)}
            ids.append(request_id)
        bad = c.post("/v2/models/mlp/infer", json={"inputs": []}, timeout=30)
        assert bad.status_code == 400
        ids.append(bad.headers["x-paddlefn-request-id"])
        wait_for(lambda: set(ids) <= set(fake_platform.billed), timeout=20, what="usage uploaded")
        wait_for(lambda: set(ids) <= {r["request_id"] for r in read_jsonl(data / SENT)}, what="marked sent")

    records = {r["request_id"]: r for r in read_jsonl(data / USAGE)}
    first = records[ids[0]]
    assert first["status"] == 200 and first["bundle_id"] == "b-test-1" and first["model"] == "mlp"
    assert first["compute_ms"] > 0 and first["duration_ms"] >= first["compute_ms"]
    assert first["bytes_in"] > 0 and first["bytes_out"] > 0 and first["started_at"].endswith("Z")
    assert records[ids[3]]["status"] == 400
    assert fake_platform.posts[0][0] == 503  # refused first attempt ...
    assert all(auth == f"Bearer {DEVICE_KEY}" for _, auth, _ in fake_platform.posts)
    assert all(body["bundle_id"] == "b-test-1" for _, _, body in fake_platform.posts)

    # A restart of the edge server re-sends nothing already acknowledged, and bills new requests once.
    posts_before = len(fake_platform.posts)
    port = free_port()
    with edge_serve(bundle, data, port, tmp_path / "edge2.log", *upload):
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", json=oip_body(inputs), timeout=30)
        assert r.status_code == 200
        new_id = r.headers["x-paddlefn-request-id"]
        wait_for(lambda: new_id in fake_platform.billed, timeout=20, what="second upload")
    resent = [
        rec["request_id"] for _, _, body in fake_platform.posts[posts_before:] for rec in body["records"]
    ]
    assert resent == [new_id]
    assert set(fake_platform.billed) == {*ids, new_id}


def test_usage_is_marked_sent_only_on_2xx_and_retries_are_idempotent(tmp_path):
    spool = UsageSpool(tmp_path)
    for i in range(3):
        spool.record({"request_id": f"r{i}", "status": 200})
    with (tmp_path / USAGE).open("a") as f:
        f.write('{"request_id": "torn')  # a crash mid-write: that response was never sent
    fake = FakePlatform([500])
    try:
        assert upload_once(spool, fake.url, DEVICE_KEY, "b") == 0
        assert len(spool.unsent()) == 3
        assert upload_once(spool, fake.url, DEVICE_KEY, "b") == 3
        assert spool.unsent() == []
        assert upload_once(spool, fake.url, DEVICE_KEY, "b") == 0
        assert len(fake.posts) == 2  # nothing left to send: no third request
        assert sorted(fake.billed) == ["r0", "r1", "r2"]
        # After a restart, a new record is not glued to the torn line.
        UsageSpool(tmp_path).record({"request_id": "r3", "status": 200})
        assert [r["request_id"] for r in UsageSpool(tmp_path).unsent()] == ["r3"]
    finally:
        fake.close()


def rebuild(src: Path, dest: Path, *, meta: dict | None = None, digest: bool = True, nb: bytes | None = None,
            extra: tuple[str, bytes] | None = None) -> Path:  # fmt: skip
    """A copy of bundle SRC with bundle.json fields or model.nb bytes replaced, or one member added."""
    with tarfile.open(src, "r:gz") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    with tarfile.open(dest, "w:gz") as out:
        for name, data in [*members, *([extra] if extra else [])]:
            if name == "bundle.json" and meta:
                doc = {**json.loads(data), **meta}
                if digest:
                    doc["meta_sha256"] = _meta_digest(doc)
                data = json.dumps(doc).encode()
            if name == "model.nb" and nb is not None:
                data = nb
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return dest


def test_tampered_and_corrupt_bundles_are_refused(bundle, tmp_path):
    with tarfile.open(bundle, "r:gz") as tar:
        original = tar.extractfile("model.nb").read()  # type: ignore[union-attr]
    flipped = bytes([original[0] ^ 0xFF]) + original[1:]
    cases = {
        "nb": (
            rebuild(bundle, tmp_path / "nb.tar.gz", nb=flipped),
            r"corrupt or was tampered with: model\.nb",
        ),
        "meta": (
            rebuild(bundle, tmp_path / "m.tar.gz", meta={"device_key": "x"}, digest=False),
            "was modified",
        ),
        "extra": (
            rebuild(bundle, tmp_path / "e.tar.gz", extra=("run.sh", b"rm -rf /")),
            "unexpected member 'run.sh'",
        ),
    }
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    cases["truncated"] = (truncated, "not a readable bundle")
    for label, (path, message) in cases.items():
        with pytest.raises(BundleError, match=message):
            open_bundle(path, tmp_path / f"open-{label}")
        assert not (tmp_path / f"open-{label}").exists(), label  # nothing half-unpacked is left to serve
    # The edge server refuses it too, before listening, with the reason on stderr.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.lite.edge",
            "serve",
            str(cases["nb"][0]),
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2 and "refused:" in result.stderr and "tampered" in result.stderr


def test_a_bundle_from_another_lite_version_is_refused(bundle, tmp_path):
    other = rebuild(bundle, tmp_path / "other.tar.gz", meta={"lite_version": "2.13rc0"})
    with pytest.raises(
        BundleError, match=r"Paddle Lite 2\.13rc0 but this runtime has Paddle Lite 2\.12"
    ) as info:
        open_bundle(other, tmp_path / "open")
    assert "install paddlelite==2.13rc0" in str(info.value)
    assert open_bundle(bundle, tmp_path / "ok").meta["lite_version"] == "2.12"  # the untouched one opens
    result = subprocess.run(
        [sys.executable, "-m", "runtime.lite.edge", "verify", str(other)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2 and "2.13rc0" in result.stderr


def test_arm_export_converts_again_and_an_x86_machine_refuses_it(prepared_mlp, tmp_path):
    start = time.monotonic()
    meta = export_bundle(prepared_mlp, tmp_path / "arm.tar.gz", device_key=DEVICE_KEY, target="arm")
    assert meta["target"] == "arm" and time.monotonic() - start < 60
    with pytest.raises(BundleError, match="built for arm but this machine is x86"):
        open_bundle(tmp_path / "arm.tar.gz", tmp_path / "open")
    opened = open_bundle(tmp_path / "arm.tar.gz", tmp_path / "open", check_target=False)
    assert json.loads((opened.folder / "manifest.json").read_text())["lite"]["target"] == "arm"


def test_usage_is_uploaded_once_more_when_the_edge_server_stops(bundle, models, tmp_path):
    fake = FakePlatform([])
    try:
        port = free_port()
        inputs, _ = example(models["mlp"])
        upload = ("--platform", fake.url, "--upload-interval", "3600")  # no periodic upload in this test
        with edge_serve(bundle, tmp_path / "data", port, tmp_path / "edge.log", *upload):
            r = httpx.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", json=oip_body(inputs), timeout=30)
            assert r.status_code == 200
            assert fake.billed == {}
        # process() stopped it with SIGTERM: the server's last act was an upload.
        assert list(fake.billed) == [r.headers["x-paddlefn-request-id"]]
    finally:
        fake.close()


def test_export_refuses_a_model_without_lite_and_unsafe_ids(prepared_mlp, tmp_path):
    import shutil

    from runtime.spec import Manifest

    folder = tmp_path / "no-lite"
    shutil.copytree(prepared_mlp, folder)
    manifest = Manifest.load(folder)
    manifest.lite = {"available": False, "reason": "Paddle Lite reads only the legacy program format"}
    manifest.save(folder)
    with pytest.raises(BundleError, match="no Paddle Lite version: Paddle Lite reads only the legacy"):
        export_bundle(folder, tmp_path / "b.tar.gz", device_key=DEVICE_KEY)
    with pytest.raises(BundleError, match="bundle id"):
        export_bundle(prepared_mlp, tmp_path / "b.tar.gz", device_key=DEVICE_KEY, bundle_id="../../etc")
    assert not (tmp_path / "b.tar.gz").exists()
