"""The worker template is root and unconfined; what a forked worker inherits from it must give a tenant nothing:
not the template's control socket (which forks processes), nor another worker's descriptors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import deploy, example, make_tenant, oip_body, wait_for
from tests.test_lifecycle import replica_pids


def descriptors(pid: int) -> dict[str, str]:
    folder = Path(f"/proc/{pid}/fd")
    links = {}
    for fd in os.listdir(folder):
        try:
            links[fd] = os.readlink(folder / fd)
        except OSError:
            continue
    return links


def test_a_forked_worker_holds_neither_the_templates_socket_nor_another_workers_files(
    platform_factory, models
):
    p = platform_factory("--pool-size", "1")
    acme, globex = make_tenant(p, "acme"), make_tenant(p, "globex")
    deploy(acme, "classify", models["mlp"])
    deploy(globex, "classify", models["mlp"])
    (a,) = wait_for(lambda: replica_pids(p, "acme", "classify"), what="acme's replica")
    (g,) = wait_for(lambda: replica_pids(p, "globex", "classify"), what="globex's replica")
    with p.admin() as admin:
        template = admin.get("/v1/capacity").json()["memory"]["template_pid"]

    template_sockets = {link for link in descriptors(template).values() if link.startswith("socket:")}
    assert template_sockets  # its control socket
    for mine, other in ((a, g), (g, a)):
        links = set(descriptors(mine).values())
        assert not links & template_sockets, "a worker could ask the template to fork for it"
        theirs = {
            link
            for link in descriptors(other).values()
            if link.startswith("/") and not link.startswith("/dev/")
        }
        assert not links & theirs, f"worker {mine} holds files of worker {other}: {descriptors(mine)}"
        assert Path(f"/proc/{mine}/comm").read_text().strip() == "pfn-worker"


@pytest.mark.skipif(os.geteuid() != 0, reason="worker confinement applies when the platform runs as root")
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_every_thread_of_a_paddle_worker_is_in_its_confinement(platform_factory, models, start):
    """unshare() moves only the calling thread: a thread started before the worker confined itself (numpy's
    BLAS pool, started at import) would keep the host's files and network. Forked workers have one thread when
    they confine; spawned ones start no BLAS pool (OPENBLAS_NUM_THREADS=1)."""
    p = platform_factory("--pool-size", "1", PADDLEFN_WORKER_START=start)
    acme = make_tenant(p, "acme")
    deploy(acme, "classify", models["mlp"])
    assert (
        acme.http.post(
            "/t/acme/v2/models/classify/infer", json=oip_body(example(models["mlp"])[0])
        ).status_code
        == 200
    )
    (pid,) = replica_pids(p, "acme", "classify")
    ours = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("mnt", "net")}
    for task in os.listdir(f"/proc/{pid}/task"):
        for ns, host in ours.items():
            assert os.readlink(f"/proc/{pid}/task/{task}/ns/{ns}") != host, (
                f"thread {task} is in the host's {ns}"
            )
        uid = Path(f"/proc/{pid}/task/{task}/status").read_text().split("Uid:")[1].split()[0]
        assert int(uid) != 0, f"thread {task} runs as root"
