"""Confine a process to one tenant's files, as that tenant's user, before it touches the tenant's program.

A Paddle program is data, but data that names files (ops such as ``load_combine`` read any path they are given),
so whatever loads, optimises or runs a tenant's program (a serving worker, deploy preparation, the Paddle Lite
conversion it starts) first confines itself (Linux, platform running as root):

1. private mount and network namespaces: nothing mounted here leaks back, and there is no network at all (only
   a loopback device that is down; a Unix socket that was already listening, the worker's line to the gateway,
   keeps working);
2. the platform's data folder becomes an empty tmpfs holding only the one folder this process may see (the
   tenant's folder read-only for a worker; the function's version folder, writable, for preparation): the
   database, the usage journal and every other tenant are simply absent;
3. ``/tmp`` and ``/dev/shm`` become private, size-limited tmpfs mounts (what must stay reachable below ``/tmp``,
   the interpreter in a test's temporary folder say, is bind-mounted back); ``/proc`` is mounted again with
   ``hidepid=invisible`` so that other users' processes and their command lines are out of sight;
4. the interpreter stays reachable: any folder on the way to Python's own files that others may not traverse
   (``/root`` under pyenv, typically) is replaced the same way by a tmpfs holding just that path;
5. resource limits: processes (threads count too) of the tenant's user, CPU seconds and the largest file
   written, when asked; no core dumps;
6. it becomes the tenant's own unprivileged user (no groups, no capabilities, no way back: ``no_new_privs``).

Each step uses plain Linux calls through ctypes (``unshare``, ``mount``, ``prctl``), as this runtime imports
nothing but Paddle, numpy and its server.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2


class ConfinementError(OSError):
    """The process could not be confined (not root, no namespaces); the message says which step failed."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of a confined process (0: none)."""

    max_processes: int = 256  # RLIMIT_NPROC: tasks (threads too) of the tenant's user, all its processes
    cpu_seconds: int = 0  # RLIMIT_CPU: a program that never ends is stopped at this much CPU time
    max_file_mb: int = 0  # RLIMIT_FSIZE: the largest file it may write
    tmp_mb: int = 64  # size of the private /tmp and /dev/shm
    max_memory_mb: int = 0  # RLIMIT_AS: address space (Paddle reserves a lot of it: set with care)


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise ConfinementError(errno, f"{what}: {os.strerror(errno)}")


def _mount(
    source: str | None, target: str | Path, fstype: str | None, flags: int, data: str | None = None
) -> None:
    def encode(s: str | Path | None) -> bytes | None:
        return None if s is None else str(s).encode()

    result = _libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))
    _check(result, f"mount {target}")


def _replace_with(folder: Path, keep: list[Path], mode: str = "0755", size: str = "1m") -> None:
    """In this namespace, FOLDER becomes an empty tmpfs that holds only the paths KEEP (below it), bind-mounted.

    The paths are opened (O_PATH) before the tmpfs hides them and bound back from ``/proc/self/fd``, so no
    staging folder is needed (one in /tmp would vanish when /tmp itself is replaced)."""
    fds = [os.open(path, os.O_PATH) for path in keep]
    folders = [path.is_dir() for path in keep]  # asked now: once the tmpfs is on, the paths are hidden
    try:
        _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size={size}")
        for path, fd, is_folder in zip(keep, fds, folders, strict=True):
            target = folder / path.relative_to(folder)
            if is_folder:
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
    finally:
        for fd in fds:
            os.close(fd)


def _blocking_ancestor(path: Path) -> Path | None:
    """The highest folder above PATH that other users may not traverse, if any."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


def _outermost(paths: list[Path]) -> list[Path]:
    """PATHS without those inside another of them (binding the outer one brings them along)."""
    unique = sorted(set(paths))
    return [p for p in unique if not any(q != p and q in p.parents for q in unique)]


def confine(
    visible: Path, data_dir: Path, uid: int, *, writable: bool = False, limits: Limits | None = None
) -> None:
    """Leave this process seeing only VISIBLE (read-only unless WRITABLE) of DATA_DIR, with no network, private
    /tmp and /dev/shm, as user UID, within LIMITS. Irreversible."""
    if os.geteuid() != 0:
        raise ConfinementError(1, "confinement needs the platform to run as root")
    limits = limits or Limits()
    visible, data_dir = visible.resolve(), data_dir.resolve()
    if data_dir not in visible.parents:
        raise ConfinementError(22, f"{visible} is not inside {data_dir}")
    from runtime.lite import lite_python

    needed = [Path(sys.prefix), Path(sys.base_prefix), Path(__file__).parents[1], data_dir]
    lite = lite_python()
    if lite is not None:  # the Lite engine host's interpreter (a venv whose python links into pyenv)
        needed += [lite.parent.parent, lite.resolve().parent.parent]
    resolved = [p.resolve() for p in needed]
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare(CLONE_NEWNS | CLONE_NEWNET)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here leaks back to the platform

    tmp = Path("/tmp").resolve()
    size = f"{limits.tmp_mb}m"
    _replace_with(tmp, _outermost([p for p in resolved if tmp in p.parents]), mode="1777", size=size)
    if os.path.isdir("/dev/shm"):
        _replace_with(Path("/dev/shm"), [], mode="1777", size=size)
    for _ in range(32):  # one level of non-traversable folders per round (/root, /tmp/pytest-of-root, ...)
        keep_by_folder: dict[Path, set[Path]] = {}
        for path in resolved:
            blocking = _blocking_ancestor(path)
            if blocking is not None:  # keep its whole first level below the blocking folder (/root/.pyenv)
                keep_by_folder.setdefault(blocking, set()).add(blocking / path.relative_to(blocking).parts[0])
        if not keep_by_folder:
            break
        for folder, keep in sorted(keep_by_folder.items()):
            _replace_with(folder, sorted(keep))
    _replace_with(data_dir, [visible])
    _mount(None, visible, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if writable else MS_RDONLY))
    # Other users' processes (the platform's, other tenants') disappear from /proc, command lines included.
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV, "hidepid=invisible")

    # The working folder still points into the tree as it was (under the new mounts): leave it, or a relative
    # path (`..` from a folder below /tmp) would walk the hidden, unconfined tree.
    os.chdir("/")
    os.environ["HOME"] = os.environ["TMPDIR"] = str(tmp)
    _set_limits(limits)
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


def _set_limits(limits: Limits) -> None:
    """Lower the limits while still root (a process may always lower its own; none can raise them again)."""
    wanted = [(resource.RLIMIT_CORE, 0)]
    if limits.max_processes:
        wanted.append((resource.RLIMIT_NPROC, limits.max_processes))
    if limits.cpu_seconds:
        wanted.append((resource.RLIMIT_CPU, limits.cpu_seconds))
    if limits.max_file_mb:
        wanted.append((resource.RLIMIT_FSIZE, limits.max_file_mb * 1024 * 1024))
    if limits.max_memory_mb:
        wanted.append((resource.RLIMIT_AS, limits.max_memory_mb * 1024 * 1024))
    for which, value in wanted:
        _soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # CPU: SIGXCPU at the soft limit tells why it stopped; the hard one (SIGKILL) only if that is ignored.
        top = value + 5 if which == resource.RLIMIT_CPU and hard == resource.RLIM_INFINITY else value
        with contextlib.suppress(ValueError):
            resource.setrlimit(which, (value, top))
