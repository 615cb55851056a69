"""The platform on a real PostgreSQL server (started here from the machine's binaries), surviving a restart."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import deploy, example, free_port, make_tenant, oip_body, outputs_of, wait_for


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; as root, run it as 'nobody'."""
    return ["runuser", "-u", "nobody", "--", *command] if os.getuid() == 0 else command


@pytest.fixture
def postgres_url() -> Iterator[str]:
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (make test installs Debian's postgresql)")
    # Outside pytest's private (0700, root-owned) temp tree, so that 'nobody' can own the cluster.
    root = Path(tempfile.mkdtemp(prefix="paddlefn-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if os.getuid() == 0:
        shutil.chown(root, "nobody")
        shutil.chown(sockets, "nobody")
    subprocess.run(_as_postgres_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "paddlefn",
                                      "--auth=trust", "-E", "UTF8"]), check=True, capture_output=True)  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        _as_postgres_user(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(sockets),
                "-c",
                "listen_addresses=127.0.0.1",
            ]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import psycopg

        def accepting() -> bool:
            try:
                psycopg.connect(
                    f"host=127.0.0.1 port={port} user=paddlefn dbname=postgres", connect_timeout=1
                ).close()
                return True
            except psycopg.OperationalError:
                return False

        wait_for(accepting, timeout=30, what="PostgreSQL to accept connections")
        with psycopg.connect(
            f"host=127.0.0.1 port={port} user=paddlefn dbname=postgres", autocommit=True
        ) as c:
            c.execute("CREATE DATABASE paddlefn")
        yield f"postgresql+psycopg://paddlefn@127.0.0.1:{port}/paddlefn"
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def test_state_lives_in_postgresql_and_survives_a_restart(platform_factory, postgres_url, models, tmp_path):
    first = platform_factory(
        "--pool-size", "1", data_dir=tmp_path / "state", PADDLEFN_DATABASE_URL=postgres_url
    )
    acme = make_tenant(first, "acme")
    deploy(acme, "classify", models["mlp"])
    first.stop()
    assert not (tmp_path / "state" / "paddlefn.db").exists()  # nothing went to SQLite

    import psycopg

    with psycopg.connect(postgres_url.replace("postgresql+psycopg", "postgresql")) as c:
        names = c.execute("SELECT name, status FROM functions").fetchall()
        assert names == [("classify", "ready")]
        assert c.execute("SELECT version_num FROM alembic_version").fetchone() is not None

    second = platform_factory(
        "--pool-size", "1", data_dir=tmp_path / "state", PADDLEFN_DATABASE_URL=postgres_url
    )
    http = second.client(acme.key)
    inputs, expected = example(models["mlp"])
    r = http.post("/t/acme/v2/models/classify/infer", json=oip_body(inputs))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        outputs_of(r.json())["softmax_0.tmp_0"], expected["softmax_0.tmp_0"], rtol=1e-5
    )
