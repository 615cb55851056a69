"""Whatever runs a tenant's program is confined: its own tenant's files only, as the tenant's own user, no network,
private /tmp and /dev/shm, other processes out of sight, limits on processes; and no platform secrets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY, deploy, make_tenant, wait_for
from tests.test_lifecycle import replica_pids

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="worker confinement applies when the platform runs as root"
)

UID_BASE = 200_000  # Settings.tenant_uid_base


def test_a_confined_process_sees_only_its_tenant_read_only_as_that_tenants_user(tmp_path: Path):
    data = tmp_path / "data"
    for tenant in ("acme", "globex"):
        (data / "tenants" / tenant).mkdir(parents=True)
        (data / "tenants" / tenant / "weights.pdiparams").write_bytes(b"secret of " + tenant.encode())
        os.chown(data / "tenants" / tenant, UID_BASE + 1, UID_BASE + 1)
        os.chown(data / "tenants" / tenant / "weights.pdiparams", UID_BASE + 1, UID_BASE + 1)
    (data / "paddlefn.db").write_bytes(b"keys and usage")
    probe = textwrap.dedent(f"""
        import os, json
        from pathlib import Path
        from runtime.isolation import confine
        data = Path({str(data)!r})
        confine(data / "tenants" / "acme", data, {UID_BASE + 1})
        def attempt(action):
            try:
                return repr(action())
            except OSError as exc:
                return type(exc).__name__
        print(json.dumps({{
            "uid": os.getuid(), "euid": os.geteuid(), "groups": os.getgroups(),
            "own": attempt(lambda: (data / "tenants/acme/weights.pdiparams").read_bytes()),
            "other": attempt(lambda: (data / "tenants/globex/weights.pdiparams").read_bytes()),
            "database": attempt(lambda: (data / "paddlefn.db").read_bytes()),
            "write_own": attempt(lambda: (data / "tenants/acme/new").write_bytes(b"x")),
            "regain_root": attempt(lambda: os.setuid(0)),
            "import_after": attempt(lambda: __import__("decimal").Decimal(1)),
        }}))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    if result.returncode and "unshare" in result.stderr:
        pytest.skip(f"no mount namespaces on this machine: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["uid"] == seen["euid"] == UID_BASE + 1 and seen["groups"] == []
    assert seen["own"] == repr(b"secret of acme")
    assert seen["other"] == "FileNotFoundError"  # not even there
    assert seen["database"] == "FileNotFoundError"
    assert seen["write_own"] in ("OSError", "PermissionError")  # read-only
    assert seen["regain_root"] == "PermissionError"
    assert seen["import_after"] == "Decimal('1')"  # the interpreter's own files stay reachable
    assert (data / "paddlefn.db").read_bytes() == b"keys and usage"  # nothing changed outside


def test_a_confined_process_has_no_network_private_tmp_and_sees_no_other_process(tmp_path: Path):
    data = tmp_path / "data"
    (data / "tenants" / "acme").mkdir(parents=True)
    listener = socket.create_server(("127.0.0.1", 0))  # stands for the platform's own port
    port = listener.getsockname()[1]
    outside = Path("/tmp") / f"paddlefn-confinement-{os.getpid()}"
    probe = textwrap.dedent(f"""
        import json, os, resource, socket
        from pathlib import Path
        from runtime.isolation import Limits, confine
        confine(Path({str(data / "tenants" / "acme")!r}), Path({str(data)!r}), {UID_BASE + 7},
                limits=Limits(max_processes=64))
        def attempt(action):
            try:
                return repr(action())
            except OSError as exc:
                return type(exc).__name__
        def connect():
            with socket.create_connection(("127.0.0.1", {port}), timeout=2):
                return "connected"
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        print(json.dumps({{
            "tmp_write": attempt(lambda: Path({str(outside)!r}).write_text("left behind")),
            "shm_write": attempt(lambda: Path("/dev/shm/paddlefn-probe").write_text("x")),
            "connect": attempt(connect),
            "other_pids": sorted(int(p) for p in pids if int(p) != os.getpid()),
            "parent_cmdline": attempt(lambda: Path("/proc/{os.getpid()}/cmdline").read_bytes()),
            "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
            "cwd": os.getcwd(),
            "up_from_cwd": attempt(lambda: sorted(os.listdir(".."))),
        }}))
    """)
    with listener:  # started in a folder below /tmp: its working folder must not stay in the hidden tree
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=data
        )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["tmp_write"] != "OSError" and not outside.exists()  # it wrote into its own /tmp, not ours
    assert not Path("/dev/shm/paddlefn-probe").exists()
    assert seen["connect"] in ("OSError", "ConnectionRefusedError")  # network unreachable: no network at all
    assert seen["other_pids"] == []  # the platform, other tenants: out of sight
    assert seen["parent_cmdline"] in ("FileNotFoundError", "PermissionError")
    assert seen["nproc"] == 64
    assert seen["cwd"] == "/" and "data" not in seen["up_from_cwd"]


def test_platform_workers_run_confined_without_platform_secrets(platform, models):
    acme = make_tenant(platform, "acme")
    globex = make_tenant(platform, "globex")
    deploy(acme, "classify", models["mlp"], {"idle_timeout_s": 600})  # stays warm while we look
    deploy(globex, "classify", models["mlp"], {"idle_timeout_s": 600})
    [pid] = wait_for(lambda: replica_pids(platform, "acme", "classify"), what="acme's replica")
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert uid >= UID_BASE and uid != 0

    # /proc/PID/root shows the files as that process sees them, through its own mount namespace
    seen_data = Path(f"/proc/{pid}/root") / platform.data_dir.resolve().relative_to("/")
    assert (seen_data / "tenants" / "acme").is_dir()
    assert not (seen_data / "tenants" / "globex").exists()
    assert not (seen_data / "paddlefn.db").exists()
    assert (platform.data_dir / "tenants" / "globex").is_dir()  # still there for everyone else

    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert ADMIN_KEY.encode() not in environ and b"PADDLEFN_" not in environ

    [other] = wait_for(lambda: replica_pids(platform, "globex", "classify"), what="globex's replica")
    other_status = Path(f"/proc/{other}/status").read_text()
    other_uid = int(next(line for line in other_status.splitlines() if line.startswith("Uid:")).split()[1])
    assert other_uid != uid
