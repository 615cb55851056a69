"""One tenant's burst of deploys does not delay another tenant's: deploy slots are taken in turns by tenant
(functions/deployqueue.py), and nothing before the queue (upload, unpack, program check) is shared in arrival
order across tenants."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import httpx

from tests.conftest import deploy, make_tenant, wait_for, wait_status

BURST = 10


def finished_deploys(platform) -> list[str]:
    """'tenant/function' of each finished deploy, in the order they finished (the audit log's order)."""
    with platform.admin() as admin:
        entries = admin.get("/v1/audit", params={"limit": 1000}).json()["entries"]
    return [f"{e['tenant']}/{e['target']}" for e in entries if e["action"] == "function.deploy"]


def test_another_tenants_deploy_is_not_queued_behind_a_burst(platform, models):
    noisy = make_tenant(platform, "noisy")
    quiet = make_tenant(platform, "quiet")
    for i in range(BURST):
        deploy(noisy, f"burst{i}", models["mlp"], wait=False)  # all accepted (202) and queued at once

    deploy(quiet, "mine", models["mlp"], wait=False)
    assert wait_status(quiet, "mine", timeout=240)["status"] == "ready"

    order = wait_for(lambda: finished_deploys(platform) or None, what="a finished deploy")
    assert "quiet/mine" in order, order
    before = order.index("quiet/mine")
    # It started at once beside the noisy tenant's first (one deploy slot each); at most that one, and one more
    # that happened to finish first, are ahead of it: never the other queued ones.
    assert before <= 2, order
    assert all(d.startswith("noisy/") for d in order[:before])


def heavy_archive(model: Path, files: int) -> bytes:
    """The model and FILES small extra files: cheap to send, slow to unpack and to measure."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(model.iterdir()):
            tar.add(path, arcname=path.name)
        for i in range(files):
            data = os.urandom(64)
            info = tarfile.TarInfo(f"extra/{i // 100}/{i}.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_another_tenants_upload_is_not_held_behind_a_burst_of_slow_unpacks(platform, models):
    noisy = make_tenant(platform, "noisy")
    quiet = make_tenant(platform, "quiet")
    heavy = heavy_archive(models["mlp"], 5000)
    light = heavy_archive(models["mlp"], 0)
    answered: list[str] = []
    lock = threading.Lock()

    def post(tenant, name: str, body: bytes) -> None:
        with httpx.Client(base_url=platform.url, timeout=240,
                          headers={"authorization": f"Bearer {tenant.key}"}) as http:  # fmt: skip
            r = http.post(f"/v1/tenants/{tenant.name}/functions", data={"name": name},
                          files={"model": ("m.tar.gz", body, "application/gzip")})  # fmt: skip
        assert r.status_code == 202, r.text
        with lock:
            answered.append(f"{tenant.name}/{name}")

    burst = [threading.Thread(target=post, args=(noisy, f"burst{i}", heavy)) for i in range(BURST)]
    for t in burst:
        t.start()
    wait_for(lambda: answered, timeout=120, what="the first of the burst to be accepted")
    mine = threading.Thread(target=post, args=(quiet, "mine", light))
    mine.start()
    for t in [*burst, mine]:
        t.join()
    assert len(answered) == BURST + 1
    # Accepted after at most two more of the burst (those unpacking when it came), not after all of them.
    assert answered.index("quiet/mine") <= 3, answered
