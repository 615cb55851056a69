"""A tenant's Paddle program is data that names files: the attacks of the security review, as tests.

Programs with file, print or network ops are refused at upload (400 naming the op) and nothing is read or
written; whatever does run a tenant's program at deploy (optimisation, golden check, Lite conversion) runs
confined as that tenant; a program that never ends is stopped at its limit while other tenants' deploys go on,
and deleting its function stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.model_files import find_model
from runtime.program_check import UnsafeProgram, check_program, refusal
from tests.conftest import deploy, make_tenant, wait_for, wait_status

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="confinement applies when the platform runs as root")


def hostile(kind: str, out: Path, *args: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "tests.security.hostile_programs", kind, str(out), *args],
        check=True,
        capture_output=True,
        env={**os.environ, "GLOG_minloglevel": "2", "FLAGS_enable_pir_api": "0"},
    )
    return out


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("outside") / "canary.txt"
    path.write_text("the platform's secret")
    return path


FILE_OPS = [
    ("read_file", "filename", False),
    ("read_file", "filename", True),  # inside a sub-block (a while body): every block is read
    ("load", "file_path", False),
    ("load_combine", "file_path", False),
    ("save", "file_path", True),
    ("save_combine", "file_path", False),
    ("print", "message", False),
    ("py_func", "forward_callable_id", False),
    ("send_v2", "ring_id", False),
    ("c_allreduce_sum", "ring_id", False),
    ("some_future_op", "filename", False),  # unknown op, but an attribute that names a file
]


@pytest.mark.parametrize(("op", "attr", "sub_block"), FILE_OPS)
def test_programs_with_file_print_or_network_ops_are_refused_naming_the_op(
    tmp_path: Path, canary: Path, op: str, attr: str, sub_block: bool
):
    args = ["--op", op, "--attr", f"{attr}={canary}"] + (["--sub-block"] if sub_block else [])
    model = hostile("file-op", tmp_path / "model", *args)
    with pytest.raises(UnsafeProgram, match=f"'{op}'"):
        check_program(find_model(model))


def test_pir_programs_get_the_same_check(tmp_path: Path, canary: Path):
    model = hostile("pir-file-op", tmp_path / "model", "--op", "read_file", "--attr", f"filename={canary}")
    with pytest.raises(UnsafeProgram, match="'read_file'"):
        check_program(find_model(model))


def test_ordinary_models_pass_the_check(models, mobilenet):
    for model in [*models.values(), mobilenet]:
        check_program(find_model(model))
    assert refusal("conv2d", {"strides", "paddings"}) == ""
    assert refusal("while", {"sub_block", "is_test"}) == ""


def test_the_private_descriptor_matches_paddles_framework_proto():
    """The checker reads programs with its own descriptor: its field numbers must be Paddle's."""
    probe = (
        "import json\nfrom paddle.base.proto import framework_pb2 as f\n"
        "d = {'blocks': f.ProgramDesc.DESCRIPTOR.fields_by_name['blocks'].number,\n"
        "     'ops': f.BlockDesc.DESCRIPTOR.fields_by_name['ops'].number,\n"
        "     'type': f.OpDesc.DESCRIPTOR.fields_by_name['type'].number,\n"
        "     'attrs': f.OpDesc.DESCRIPTOR.fields_by_name['attrs'].number,\n"
        "     'name': f.OpDesc.Attr.DESCRIPTOR.fields_by_name['name'].number}\n"
        "print(json.dumps(d))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "blocks": 1, "ops": 4, "type": 3, "attrs": 4, "name": 1
    }  # fmt: skip


def _upload(tenant, name: str, model: Path):  # type: ignore[no-untyped-def]
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(model.iterdir()):
            tar.add(path, arcname=path.name)
    return tenant.http.post(
        f"/v1/tenants/{tenant.name}/functions",
        data={"name": name, "config": "{}"},
        files={"model": ("model.tar.gz", buf.getvalue(), "application/gzip")},
    )


def test_the_platform_refuses_them_at_upload_and_nothing_is_read_or_written(
    platform, tmp_path: Path, canary: Path
):
    acme = make_tenant(platform, "acme")
    victim = make_tenant(platform, "victim")
    written = [tmp_path / "pwned-by-save", platform.data_dir / "tenants" / "victim" / "pwned"]
    attacks = {
        "steal": hostile("file-op", tmp_path / "steal", "--op", "read_file", "--attr", f"filename={canary}"),
        "db": hostile("file-op", tmp_path / "db", "--op", "read_file",
                      "--attr", f"filename={platform.data_dir / 'paddlefn.db'}"),
        "write": hostile("file-op", tmp_path / "write", "--op", "save", "--attr", f"file_path={written[0]}",
                         "--sub-block"),
        "plant": hostile("file-op", tmp_path / "plant", "--op", "save_combine",
                         "--attr", f"file_path={written[1]}"),
        "pir": hostile("pir-file-op", tmp_path / "pir", "--op", "load_combine", "--attr", "file_path=/etc/passwd"),
    }  # fmt: skip
    for name, model in attacks.items():
        r = _upload(acme, name, model)
        assert r.status_code == 400, r.text
        assert "holds the op" in r.json()["error"], r.text
        assert str(platform.data_dir.resolve()) not in r.text  # no host paths in messages
    assert acme.http.get("/v1/tenants/acme/functions").json()["functions"] == []
    assert not any(p.exists() for p in written)
    assert victim.http.get("/v1/tenants/victim/functions").status_code == 200


@as_root
def test_deploy_preparation_runs_as_the_tenant_not_as_root(platform, models):
    acme = make_tenant(platform, "acme")
    fn = deploy(acme, "classify", models["mlp"])
    assert fn["status"] == "ready", fn
    [serving] = list((platform.data_dir / "tenants" / "acme" / "functions" / "classify").glob("*/serving"))
    manifest = serving / "manifest.json"
    uid = manifest.stat().st_uid  # written by the preparation process itself
    assert uid >= 200_000 and uid != 0


@as_root
def test_a_never_ending_program_is_stopped_while_another_tenants_deploy_proceeds(
    platform_factory, models, tmp_path: Path
):
    p = platform_factory("--pool-size", "1", PADDLEFN_DEPLOY_TIMEOUT_S="25")
    attacker = make_tenant(p, "attacker")
    other = make_tenant(p, "other")
    forever = hostile("forever", tmp_path / "forever")
    for name in ("loop1", "loop2"):  # two: today's two deploy slots, both of them
        assert _upload(attacker, name, forever).status_code == 202
    deploy(other, "classify", models["mlp"], wait=False)
    fn = wait_status(other, "classify", timeout=120)
    assert fn["status"] == "ready", fn
    # The attacker still waits for its loops: one runs, one is queued behind it (its own turn, not everyone's)
    statuses = {
        n: attacker.http.get(f"/v1/tenants/attacker/functions/{n}").json()["status"]
        for n in ("loop1", "loop2")
    }
    assert "deploying" in statuses.values(), statuses
    for name in ("loop1", "loop2"):
        failed = wait_status(attacker, name, timeout=120)
        assert failed["status"] == "failed"
        assert "stopped" in failed["error"] and "never ends" in failed["error"], failed["error"]
    assert not _prepare_processes(p)


@as_root
def test_deleting_a_function_stops_its_preparation(platform_factory, tmp_path: Path):
    p = platform_factory("--pool-size", "1")
    attacker = make_tenant(p, "attacker")
    assert _upload(attacker, "loop", hostile("forever", tmp_path / "forever")).status_code == 202
    wait_for(lambda: _prepare_processes(p), timeout=60, what="the preparation process")
    assert attacker.http.delete("/v1/tenants/attacker/functions/loop").status_code == 204
    wait_for(lambda: not _prepare_processes(p), timeout=20, what="the preparation to stop")


def _prepare_processes(p) -> list[int]:
    """The platform's preparation processes: forked from its worker template (named pfn-prepare), or spawned
    (``python -m runtime.prepare`` with the platform's data dir on the command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            comm = (entry / "comm").read_text().strip()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        spawned = b"runtime.prepare" in cmdline and str(p.data_dir.resolve()).encode() in cmdline
        forked = comm == "pfn-prepare" and _parent_of(parent) == p.process.pid
        if spawned or forked:
            found.append(int(entry.name))
    time.sleep(0)  # a snapshot; the callers poll
    return found


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return 0


def test_a_deep_archive_path_is_refused_without_showing_host_paths(platform):
    import io
    import tarfile

    acme = make_tenant(platform, "acme")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("/".join(["d" * 200] * 40) + "/model.pdmodel")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    r = acme.http.post(
        "/v1/tenants/acme/functions",
        data={"name": "deep", "config": "{}"},
        files={"model": ("model.tar.gz", buf.getvalue(), "application/gzip")},
    )
    assert r.status_code == 400, r.text
    assert "nested too deep" in r.json()["error"]
    assert str(platform.data_dir.resolve()) not in r.text and "/tenants/" not in r.text
