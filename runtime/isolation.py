"""Confine a worker to its own tenant's files before it loads a model (Linux, platform running as root).

A Paddle program is data, but data that names files: ops such as ``load_combine`` read any path they are given.
So before a worker loads a tenant's model it

1. enters a private mount namespace, where the platform's data folder is replaced by an empty tmpfs holding only
   this tenant's folder (read-only): the database, the usage journal and every other tenant are simply absent;
2. keeps the interpreter reachable: any folder on the way to Python's own files that others may not traverse
   (``/root`` under pyenv, typically) is replaced the same way by a tmpfs holding just that path;
3. becomes the tenant's own unprivileged user (no groups, no capabilities, no way back: ``no_new_privs``).

Each step uses plain Linux calls through ctypes (``unshare``, ``mount``, ``prctl``), as this runtime imports
nothing but Paddle, numpy and its server.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys
import tempfile
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = (
    1, 2, 4, 32, 4096, 8192, 16384, 1 << 18,
)  # fmt: skip
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2


class ConfinementError(OSError):
    """The worker could not be confined (not root, no mount namespaces); the message says which step failed."""


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise ConfinementError(errno, f"{what}: {os.strerror(errno)}")


def _mount(
    source: str | None, target: str | Path, fstype: str | None, flags: int, data: str | None = None
) -> None:
    encode = lambda s: None if s is None else str(s).encode()  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)),
           f"mount {target}")  # fmt: skip


def _replace_with(folder: Path, keep: list[Path]) -> None:
    """In this namespace, FOLDER becomes an empty tmpfs that holds only the paths KEEP (below it), bind-mounted."""
    stages = []
    try:
        for path in keep:  # bind them aside first: once the tmpfs is on, they are out of reach
            stage = Path(tempfile.mkdtemp(prefix="paddlefn-stage-"))
            stages.append(stage)
            _mount(str(path), stage, None, MS_BIND | MS_REC)
        _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for path, stage in zip(keep, stages, strict=True):
            target = folder / path.relative_to(folder)
            target.mkdir(parents=True, exist_ok=True)
            _mount(str(stage), target, None, MS_MOVE)
    finally:
        for stage in stages:
            stage.rmdir()


def _blocking_ancestor(path: Path) -> Path | None:
    """The highest folder above PATH that other users may not traverse, if any."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


def confine(tenant_dir: Path, data_dir: Path, uid: int) -> None:
    """Leave this process seeing only TENANT_DIR (read-only) of DATA_DIR, as user UID. Irreversible."""
    if os.geteuid() != 0:
        raise ConfinementError(1, "confinement needs the platform to run as root")
    tenant_dir, data_dir = tenant_dir.resolve(), data_dir.resolve()
    if data_dir not in tenant_dir.parents:
        raise ConfinementError(22, f"{tenant_dir} is not inside {data_dir}")
    from runtime.lite import lite_python

    needed = [Path(sys.prefix), Path(sys.base_prefix), Path(__file__).parents[1], data_dir]
    lite = lite_python()
    if lite is not None:  # the Lite engine host's interpreter (a venv whose python links into pyenv)
        needed += [lite.parent.parent, lite.resolve().parent.parent]
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here leaks back to the platform
    resolved = [p.resolve() for p in needed]
    for _ in range(
        32
    ):  # one level of non-traversable folders per round (/root, /tmp/pytest-of-root/pytest-3, ...)
        keep_by_folder: dict[Path, set[Path]] = {}
        for path in resolved:
            blocking = _blocking_ancestor(path)
            if (
                blocking is not None
            ):  # keep its whole first level below the blocking folder (e.g. /root/.pyenv)
                keep_by_folder.setdefault(blocking, set()).add(blocking / path.relative_to(blocking).parts[0])
        if not keep_by_folder:
            break
        for folder, keep in sorted(keep_by_folder.items()):
            _replace_with(folder, sorted(keep))
    _replace_with(data_dir, [tenant_dir])
    _mount(None, tenant_dir, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.environ["HOME"] = tempfile.gettempdir()
    deathsig, parent = ctypes.c_int(0), os.getppid()
    _check(_libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(deathsig), 0, 0, 0), "prctl(PR_GET_PDEATHSIG)")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # from uid 0 to another: every capability goes with it
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if deathsig.value:  # the kernel clears the parent-death signal when credentials change: set it again
        _check(_libc.prctl(PR_SET_PDEATHSIG, deathsig.value, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # the parent died in between: the signal will not come
            os._exit(1)
