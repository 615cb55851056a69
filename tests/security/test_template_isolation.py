"""The worker template is root and unconfined; what a forked worker inherits from it must give a tenant nothing:
not the template's control socket (which forks processes), nor another worker's descriptors."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import deploy, make_tenant, wait_for
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
