"""A Lite function's engine host is confined like its worker: the host a pre-warmed Lite worker starts before it
is given a model (a spare, root and unconfined while it waits) takes on the worker's confinement before it reads
the model; the host started to replace a crashed one is confined too. Confined = the tenant's uid, no groups, no
capabilities, no_new_privs, the worker's mount and network namespaces and limits, no other tenant's files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import deploy, example, make_tenant, oip_body, outputs_of, wait_for
from tests.lite_support import REPO, needs_lite, prepare
from tests.test_lifecycle import replica_pids

pytestmark = [
    needs_lite,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="worker confinement applies when the platform runs as root"),
]

UID = 200_101  # a tenant's uid for the tests that start workers themselves (Settings.tenant_uid_base + id)


def status(pid: int) -> dict[str, list[str]]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return fields


def namespaces(pid: int | str) -> dict[str, str]:
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in ("mnt", "net")}


def limit(pid: int, name: str) -> str:
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if ln.startswith(name))
    return line[26:].split()[0]


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def assert_confined_like(host: int, worker: int, uid: int, data: Path, own: str, other: str) -> None:
    """HOST runs as UID like WORKER, in WORKER's namespaces (not ours), seeing OWN's folder of DATA and not OTHER's."""
    seen = status(host)
    assert seen["Uid"] == [str(uid)] * 4 and seen["Gid"] == [str(uid)] * 4 and seen["Groups"] == []
    assert seen["CapEff"] == seen["CapPrm"] == ["0000000000000000"]
    assert seen["NoNewPrivs"] == ["1"]
    assert namespaces(host) == namespaces(worker) != namespaces("self")
    # A namespace belongs to a thread: every thread of the worker (the engine thread that starts a host after a
    # crash above all) and of the host must be in it, not only the main ones.
    for pid in (worker, host):
        tasks = [t.name for t in Path(f"/proc/{pid}/task").iterdir()]
        assert all(namespaces(f"{pid}/task/{t}") == namespaces(worker) for t in tasks), pid
    assert limit(host, "Max processes") == limit(worker, "Max processes")
    assert limit(host, "Max core file size") == "0"
    # /proc/PID/root shows the files as that process sees them, through its own mount namespace
    seen_data = Path(f"/proc/{host}/root") / data.resolve().relative_to("/")
    assert (seen_data / "tenants" / own).is_dir()
    assert not (seen_data / "tenants" / other).exists()
    assert not (seen_data / "paddlefn.db").exists()


@pytest.fixture(scope="module")
def lite_mlp(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Path:
    """The mlp as deploy prepares it (with its .nb)."""
    out = tmp_path_factory.mktemp("prepared") / "mlp"
    manifest = prepare(models["mlp"], out)
    assert manifest["lite"]["available"], manifest["lite"]
    return out


@pytest.fixture
def tenants(tmp_path: Path, lite_mlp: Path) -> Path:
    """A data folder with two tenants, each with the prepared mlp; acme's owned by UID. Returns the data folder."""
    data = tmp_path / "data"
    for tenant in ("acme", "globex"):
        shutil.copytree(lite_mlp, data / "tenants" / tenant / "fn")
        (data / "tenants" / tenant / "secret").write_text(f"secret of {tenant}")
    for path in [data / "tenants" / "acme", *(data / "tenants" / "acme").rglob("*")]:
        os.chown(path, UID, UID)
    (data / "paddlefn.db").write_bytes(b"keys and usage")
    return data


@pytest.fixture
def lite_worker(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    """A pre-warmed Lite worker started as the pool starts one (runtime.server --engine lite), ready."""
    run = Path(tempfile.mkdtemp(prefix="pfn-test-"))  # short: Unix socket paths are limited
    uds = run / "w.sock"
    read_fd, write_fd = os.pipe()
    log = (tmp_path / "lite-worker.log").open("wb")
    args = [sys.executable, "-m", "runtime.server", "--uds", str(uds), "--ready-fd", str(write_fd),
            "--device", "cpu", "--engine", "lite"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,), cwd=REPO,
                            env={**os.environ, "GLOG_minloglevel": "2", "OMP_NUM_THREADS": "1"})  # fmt: skip
    os.close(write_fd)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), base_url="http://worker", timeout=120)
    try:
        with os.fdopen(read_fd) as ready:
            line = ready.readline()
        assert line, (tmp_path / "lite-worker.log").read_text()
        yield proc, client
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(run, ignore_errors=True)


def load(client: httpx.Client, data: Path, confine: bool = True) -> dict:
    params: dict[str, object] = {"model_dir": str(data / "tenants" / "acme" / "fn"), "engine": "lite"}
    if confine:
        params["confine"] = {"tenant_dir": str(data / "tenants" / "acme"), "data_dir": str(data), "uid": UID,
                             "required": True, "max_processes": 128}  # fmt: skip
    r = client.post("/v2/repository/models/fn/load", json={"parameters": params})
    assert r.status_code == 200, r.text
    return r.json()


def infer_ok(client: httpx.Client, data: Path) -> None:
    folder = data / "tenants" / "acme" / "fn"
    with np.load(folder / "golden_inputs.npz") as i, np.load(folder / "golden_outputs.npz") as o:
        inputs, expected = {k: i[k] for k in i.files}, {k: o[k] for k in o.files}
    r = client.post("/v2/models/fn/infer", json=oip_body(inputs))
    assert r.status_code == 200, r.text
    assert r.headers["x-paddlefn-engine"] == "paddle-lite"
    got = outputs_of(r.json())
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-3, atol=1e-4)


def test_a_pooled_lite_workers_spare_host_takes_on_the_workers_confinement_before_the_model(
    tenants, lite_worker
):
    proc, client = lite_worker
    [spare] = children_of(proc.pid)  # started while the worker waits: root, unconfined, Lite imported
    assert status(spare)["Uid"][0] == "0" and namespaces(spare) == namespaces("self")

    loaded = load(client, tenants)
    assert loaded["confined"] is True and loaded["lite_host_prestarted"] is True
    assert children_of(proc.pid) == [spare]  # the same process took the model
    assert_confined_like(spare, proc.pid, UID, tenants, own="acme", other="globex")
    assert status(proc.pid)["Uid"][0] == str(UID)
    infer_ok(client, tenants)

    # A crashed host: the next request starts a new one, from the confined worker; it is confined as well.
    os.kill(spare, signal.SIGKILL)
    wait_for(lambda: status(spare)["State"][0] == "Z" if Path(f"/proc/{spare}").exists() else True,
             what="the host to die")  # fmt: skip
    infer_ok(client, tenants)
    [restarted] = children_of(proc.pid)
    assert restarted != spare
    assert_confined_like(restarted, proc.pid, UID, tenants, own="acme", other="globex")


def test_an_unconfined_lite_worker_keeps_its_spare_host_as_it_is(tenants, lite_worker):
    proc, client = lite_worker  # isolation off: the worker loads without confining itself
    [spare] = children_of(proc.pid)
    loaded = load(client, tenants, confine=False)
    assert loaded["confined"] is False and loaded["lite_host_prestarted"] is True
    assert children_of(proc.pid) == [spare]
    assert status(spare)["Uid"] == status(proc.pid)["Uid"] == ["0"] * 4
    assert namespaces(spare) == namespaces(proc.pid) == namespaces("self")
    infer_ok(client, tenants)


def test_a_lite_worker_whose_spare_host_died_loads_with_a_new_confined_host(tenants, lite_worker):
    proc, client = lite_worker
    [spare] = children_of(proc.pid)
    os.kill(spare, signal.SIGKILL)
    loaded = load(client, tenants)
    assert loaded["confined"] is True and loaded["lite_host_prestarted"] is False
    [host] = children_of(proc.pid)
    assert host != spare
    assert_confined_like(host, proc.pid, UID, tenants, own="acme", other="globex")
    infer_ok(client, tenants)


def test_a_spare_host_cannot_read_another_tenants_files_once_it_has_its_workers_confinement(tenants):
    # The worker's side, run in a probe: spares started before confining; confined as acme; then each spare is
    # given a model: acme's own loads, globex's (readable by anyone outside, 0644) is not there for it.
    other_nb = tenants / "tenants" / "globex" / "fn" / "model.nb"
    assert other_nb.stat().st_mode & 0o004
    probe = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from runtime.isolation import confine
        from runtime.lite.engine import LiteHost, LiteUnavailable, SpareHost
        data = Path({str(tenants)!r})
        spares = [SpareHost(), SpareHost()]
        for spare in spares:
            spare.wait_ready()
        confine(data / "tenants" / "acme", data, {UID})
        def attempt(nb, spare):
            try:
                host = LiteHost(nb, spare=spare)
            except LiteUnavailable as exc:
                return str(exc)
            host.close()
            return "loaded, prestarted=%s" % host.prestarted
        print(json.dumps({{
            "other": attempt(Path({str(other_nb)!r}), spares[0]),
            "own": attempt(data / "tenants" / "acme" / "fn" / "model.nb", spares[1]),
        }}))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "GLOG_minloglevel": "2"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["own"] == "loaded, prestarted=True"
    assert "No such file or directory" in seen["other"], seen[
        "other"
    ]  # refused by the spare itself, confined


def test_a_platform_lite_functions_host_runs_as_its_tenant_in_its_workers_namespaces(platform, models):
    acme = make_tenant(platform, "acme")
    globex = make_tenant(platform, "globex")
    assert deploy(acme, "lite", models["mlp"], {"device": "lite", "idle_timeout_s": 600})["status"] == "ready"
    assert (
        deploy(globex, "lite", models["mlp"], {"device": "lite", "idle_timeout_s": 600})["status"] == "ready"
    )
    inputs, _ = example(models["mlp"])
    hosts = {}
    for tenant in (acme, globex):
        r = tenant.http.post(f"/t/{tenant.name}/v2/models/lite/infer", json=oip_body(inputs))
        assert r.status_code == 200 and r.headers["x-paddlefn-engine"] == "paddle-lite", r.text
        [worker] = wait_for(lambda t=tenant: replica_pids(platform, t.name, "lite"), what="the replica")
        [host] = children_of(worker)
        hosts[tenant.name] = host
        uid = int(status(worker)["Uid"][0])
        assert uid >= 200_000
        other = "globex" if tenant is acme else "acme"
        assert_confined_like(host, worker, uid, platform.data_dir, own=tenant.name, other=other)
    assert status(hosts["acme"])["Uid"] != status(hosts["globex"])["Uid"]
    assert namespaces(hosts["acme"]) != namespaces(hosts["globex"])
    logs = "".join(p.read_text() for p in (platform.data_dir / "logs").glob("lite-worker-*.log"))
    assert "spare Lite host" in logs  # the pool's Lite workers gave the model to their pre-started host
