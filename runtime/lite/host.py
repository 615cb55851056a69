"""Paddle Lite engine host: loads one ``.nb`` and runs tensors it receives on stdin, answering on stdout.

Runs under the Lite interpreter (CPython 3.7, ``paddlelite==2.12``, numpy<2; see DESIGN.md), so this file keeps
to 3.7 syntax and imports only the stdlib, numpy and paddlelite. Everything else (OIP, batching, metering) stays
in the platform's modern environment; ``runtime.lite.engine`` is the other end of the pipe.

Two ways to start it:
- ``host.py MODEL.nb`` loads the model at once (deploy's conversion check; a worker replacing a crashed host).
- ``host.py --wait`` is a *spare* host, started by a pre-warmed Lite worker while it waits in the pool: the
  interpreter is up and numpy and paddlelite are imported (most of a fresh host's ~150 ms), then it waits for one
  ``{"op": "load", "nb", "env"}`` message. The worker sends it only after confining itself (runtime/isolation.py),
  and the spare, which was started before the worker was confined and so is still root and unconfined (but has
  read nothing of any tenant's), first takes on the worker's confinement, then loads the ``.nb``
  (``confine_like_parent``): it joins the worker's mount and network namespaces (``setns`` on
  ``/proc/<worker>/ns/*``), takes the worker's resource limits, groups, gid and uid, and ``no_new_privs`` when the
  worker has it. Everything is read from ``/proc`` of its parent, the worker, not taken from the message, so a
  worker that runs unconfined (not root, isolation off) has a host that stays as it is, exactly like it, and the
  message cannot ask for more than the worker has. Then it checks that its credentials, capabilities and
  namespaces are the worker's and refuses to go on otherwise.

Framing, both directions: an 8-byte big-endian header ``>II`` (JSON length, payload length), the JSON, then
the payload (raw tensor bytes, C order, back to back).
- infer request:  {"op": "infer", "inputs": [{"name", "dtype", "shape", "nbytes"}, ...]} + tensor bytes
- reply:          {"ok": true, "outputs": [{"name", "dtype", "shape", "nbytes"}, ...], "compute_ms"} + bytes
                  or {"ok": false, "error": "..."} (no payload); the host stays up after a bad request.
- the first message the host writes is {"ok": true, "ready": true, "lite_version", "inputs", "outputs",
  "load_ms"} or, when the model cannot be loaded, {"ok": false, "error", "stage": "load"} before it exits with
  status 1.
- a spare (``--wait``) first writes {"ok": true, "waiting": true, "lite_version", "start_ms"}, then reads the load
  message and goes on as above (``"confine_ms"`` in the ready message), or answers {"ok": false, "error",
  "stage": "confine"} and exits with status 1 when it cannot take on the worker's confinement (the worker then
  starts a host of its own, as it did before spares existed).
Requests are served one at a time. The host exits when stdin closes (the parent is gone or closed the pipe)
and, on Linux, when its parent dies (PR_SET_PDEATHSIG), even while inside a Lite call.

``python host.py --version`` prints the installed Paddle Lite version and exits.
"""

import ctypes
import json
import os
import resource
import signal
import struct
import sys
import time

FRAME = struct.Struct(">II")
MAX_JSON = 16 * 1024 * 1024
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# Every limit the worker has is the host's too (a host the worker starts itself inherits them all the same), by
# their names in /proc/<pid>/limits (prlimit() on another user's process needs CAP_SYS_RESOURCE, which root in a
# container often lacks).
RLIMITS = {
    "Max cpu time": "RLIMIT_CPU", "Max file size": "RLIMIT_FSIZE", "Max data size": "RLIMIT_DATA",
    "Max stack size": "RLIMIT_STACK", "Max core file size": "RLIMIT_CORE", "Max resident set": "RLIMIT_RSS",
    "Max processes": "RLIMIT_NPROC", "Max open files": "RLIMIT_NOFILE", "Max locked memory": "RLIMIT_MEMLOCK",
    "Max address space": "RLIMIT_AS", "Max file locks": "RLIMIT_LOCKS", "Max pending signals": "RLIMIT_SIGPENDING",
    "Max msgqueue size": "RLIMIT_MSGQUEUE", "Max nice priority": "RLIMIT_NICE",
    "Max realtime priority": "RLIMIT_RTPRIO", "Max realtime timeout": "RLIMIT_RTTIME",
}  # fmt: skip
# What must be the same in the host as in the worker once the host has taken on its confinement.
SAME_AS_PARENT = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")


def die_with_parent():
    # The signal follows the *thread* that started us: engines start hosts from the worker's single, long-lived
    # engine thread, which ends only when the worker does, and a spare from its main thread (the same life).
    # stdin EOF covers every orderly exit.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class ConfinementError(Exception):
    pass


def _status(pid):
    """/proc/PID/status as {key: [fields]}."""
    fields = {}
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return fields


def _limits(pid):
    """The resource limits of PID as [(resource, (soft, hard))], from /proc/PID/limits."""
    limits = []
    with open("/proc/%s/limits" % pid) as f:
        next(f)  # the column titles
        for line in f:
            name, values = line[:26].strip(), line[26:].split()
            which = getattr(resource, RLIMITS.get(name, ""), None)
            if which is None and name == "Max file locks":
                which = 10  # RLIMIT_LOCKS (asm-generic), which Python's resource module does not name
            if which is None:
                raise ConfinementError("unknown limit %r in /proc/%s/limits" % (name, pid))
            soft, hard = [resource.RLIM_INFINITY if v == "unlimited" else int(v) for v in values[:2]]
            limits.append((which, (soft, hard)))
    if len(limits) < 16:
        raise ConfinementError("read %d of the worker's limits, expected 16" % len(limits))
    return limits


def _same_namespace(fd, name):
    mine, theirs = os.stat("/proc/self/ns/" + name), os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def confine_like_parent():
    """Take on the confinement of our parent, the worker: its mount and network namespaces, its limits, groups,
    gid and uid, and no_new_privs if it has it (see the module docstring). Steps the worker did not take (it runs
    unconfined) are no-ops. Raises ConfinementError, after which this process must not go on."""
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()
    # Read everything about the parent first, while we still see the whole of /proc and may read it all.
    fds = {}
    try:
        for name, flag in (("mnt", CLONE_NEWNS), ("net", CLONE_NEWNET)):
            fds[flag] = (name, os.open("/proc/%d/ns/%s" % (parent, name), os.O_RDONLY | os.O_CLOEXEC))
        # Once confined we cannot look at the worker any more: both of us are then non-dumpable (credentials
        # changed), so its /proc entries are out of our sight under hidepid. Keep what we compare with at the end.
        their_ns = {name: os.readlink("/proc/%d/ns/%s" % (parent, name)) for name, _fd in fds.values()}
        limits = _limits(parent)
        theirs = _status(parent)
        if os.getppid() != parent:  # it died while we read: what we read may be another process's
            raise ConfinementError("the worker exited")
        for flag, (name, fd) in sorted(fds.items()):  # mnt before net: mnt is the one that may refuse
            if _same_namespace(fd, name):
                continue
            if flag == CLONE_NEWNS:
                # setns into a mount namespace refuses (EINVAL) a process whose threads share its filesystem
                # context: this host must still be single-threaded here. It is after `import numpy, paddlelite`
                # (checked: 1 thread; OPENBLAS_NUM_THREADS=1 keeps numpy's BLAS from starting a pool); Lite starts
                # its threads, if any, only with a predictor, which comes after this.
                threads = int(_status("self")["Threads"][0])
                if threads != 1:
                    raise ConfinementError("%d threads: setns(mount) needs a single-threaded process" % threads)
            if libc.setns(fd, flag) != 0:
                errno = ctypes.get_errno()
                raise ConfinementError("setns(%s): %s" % (name, os.strerror(errno)))
    except OSError as exc:
        raise ConfinementError("cannot read the worker's confinement: %s" % exc)
    finally:
        for _name, fd in fds.values():
            os.close(fd)
    os.chdir("/")  # setns(mount) moves us to the new root already; a relative path must never walk the old one
    try:
        for which, wanted in limits:  # the worker's can only be lower (it could not raise its own either)
            if resource.getrlimit(which) != wanted:
                resource.setrlimit(which, wanted)
        uid, gid = [int(v) for v in theirs["Uid"][:3]], [int(v) for v in theirs["Gid"][:3]]
        if os.getgroups() != [int(g) for g in theirs.get("Groups", [])] or os.getresgid() != tuple(gid):
            os.setgroups([int(g) for g in theirs.get("Groups", [])])
            os.setresgid(*gid)
        if os.getresuid() != tuple(uid):
            os.setresuid(*uid)  # from uid 0 to another: every capability goes with it
    except (OSError, ValueError) as exc:
        raise ConfinementError("cannot take the worker's limits and user: %s" % exc)
    if theirs["NoNewPrivs"] == ["1"] and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise ConfinementError("prctl(PR_SET_NO_NEW_PRIVS): %s" % os.strerror(ctypes.get_errno()))
    die_with_parent()  # the kernel clears the parent-death signal when credentials change: set it again
    if os.getppid() != parent:
        os._exit(1)  # the worker died in between: the signal will not come
    ours = _status("self")
    differ = [key for key in SAME_AS_PARENT if ours.get(key) != theirs.get(key)]
    if differ:
        raise ConfinementError("still differs from the worker in %s" % ", ".join(differ))
    for name, link in sorted(their_ns.items()):
        if os.readlink("/proc/self/ns/" + name) != link:
            raise ConfinementError("not in the worker's %s namespace" % name)


def lite_version():
    """'2.12' for the installed wheel (the predictor says 'v2.12'; the wheel's metadata is the plain form)."""
    import paddlelite

    here = os.path.dirname(os.path.dirname(os.path.abspath(paddlelite.__file__)))
    for entry in sorted(os.listdir(here)):
        if entry.startswith("paddlelite-") and entry.endswith((".dist-info", ".egg-info")):
            return entry[len("paddlelite-") :].rsplit(".", 1)[0]
    return "unknown"


def read_exact(stream, n):
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_message(stream):
    head = read_exact(stream, FRAME.size)
    if head is None:
        return None, None
    json_len, payload_len = FRAME.unpack(head)
    if json_len > MAX_JSON:
        raise ValueError("header of %d bytes is too large" % json_len)
    header = read_exact(stream, json_len)
    payload = read_exact(stream, payload_len) if payload_len else b""
    if header is None or payload is None:
        return None, None
    return json.loads(header.decode("utf-8")), payload


def write_message(stream, header, payload=b""):
    data = json.dumps(header).encode("utf-8")
    stream.write(FRAME.pack(len(data), len(payload)))
    stream.write(data)
    if payload:
        stream.write(payload)
    stream.flush()


class BadRequest(Exception):
    pass


def decode_inputs(np, header, payload, names):
    specs = header.get("inputs")
    if not isinstance(specs, list):
        raise BadRequest("'inputs' must be a list")
    arrays = {}
    offset = 0
    for spec in specs:
        try:
            name, dtype, shape, nbytes = spec["name"], np.dtype(spec["dtype"]), list(spec["shape"]), int(spec["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest("bad tensor description %r: %s" % (spec, exc))
        if name not in names:
            raise BadRequest("unknown input %r; the model takes %s" % (name, names))
        count = 1
        for d in shape:
            count *= int(d)
        if count * dtype.itemsize != nbytes or offset + nbytes > len(payload):
            raise BadRequest("input %r: %d bytes do not hold %s of %s" % (name, nbytes, shape, dtype))
        arrays[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += nbytes
    if offset != len(payload):
        raise BadRequest("payload has %d bytes, the inputs describe %d" % (len(payload), offset))
    missing = [n for n in names if n not in arrays]
    if missing:
        raise BadRequest("missing input(s): %s" % missing)
    return arrays


def serve(nb_path, wait=False):
    # Lite and glog may print to fd 1: keep the real stdout for the protocol and send fd 1 to stderr.
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    proto_in = os.fdopen(os.dup(0), "rb")
    started = time.time()
    confine_ms = None
    try:
        import numpy as np
        from paddlelite import lite
    except Exception as exc:  # noqa: BLE001 - reported, then the host exits
        write_message(proto_out, {"ok": False, "error": "cannot import paddlelite: %s" % exc, "stage": "load"})
        return 1
    version = lite_version()  # read now: confined, the wheel's folder is still there, but why look twice
    if wait:
        import gc

        gc.freeze()  # what is imported stays: later collections need not walk it
        waiting = {"ok": True, "waiting": True, "lite_version": version, "start_ms": (time.time() - started) * 1000}
        write_message(proto_out, waiting)
        try:
            header, _ = read_message(proto_in)
        except (ValueError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("op") != "load" or not isinstance(header.get("nb"), str):
            return 0 if header is None else 1  # stdin closed (the worker is done with us), or not a load
        started = time.time()
        try:
            confine_like_parent()
        except ConfinementError as exc:
            error = "cannot take on the worker's confinement: %s" % exc
            write_message(proto_out, {"ok": False, "error": error, "stage": "confine"})
            return 1
        confine_ms = (time.time() - started) * 1000
        env = header.get("env")
        for key, value in (env if isinstance(env, dict) else {}).items():
            if key in ("HOME", "TMPDIR") and isinstance(value, str):
                os.environ[key] = value  # the worker's, as it set them when it confined itself
        nb_path = header["nb"]
    try:
        with open(nb_path, "rb"):
            pass  # Lite aborts the process on a file it cannot open: say why instead, as any other failure
        config = lite.MobileConfig()
        config.set_model_from_file(nb_path)
        predictor = lite.create_paddle_predictor(config)
        in_names = list(predictor.get_input_names())
        out_names = list(predictor.get_output_names())
    except Exception as exc:  # noqa: BLE001 - any load failure is reported, then the host exits
        error = "cannot load %s: %s" % (os.path.basename(nb_path), exc)
        write_message(proto_out, {"ok": False, "error": error, "stage": "load"})
        return 1
    ready = {
        "ok": True,
        "ready": True,
        "lite_version": version,
        "inputs": in_names,
        "outputs": out_names,
        "load_ms": (time.time() - started) * 1000,
    }
    if confine_ms is not None:
        ready["confine_ms"] = confine_ms
    write_message(proto_out, ready)
    while True:
        try:
            header, payload = read_message(proto_in)
        except (ValueError, UnicodeDecodeError) as exc:
            # The stream is out of step; nothing after this can be trusted.
            write_message(proto_out, {"ok": False, "error": "unreadable frame: %s" % exc})
            return 1
        if header is None:
            return 0  # stdin closed: the engine is done with us
        if not isinstance(header, dict) or header.get("op") != "infer":
            write_message(proto_out, {"ok": False, "error": "unknown request %r" % (header,)})
            continue
        try:
            arrays = decode_inputs(np, header, payload, in_names)
            start = time.perf_counter()
            for i, name in enumerate(in_names):
                # numpy<2 is required here: with numpy 2, from_numpy silently copies garbage.
                predictor.get_input(i).from_numpy(np.ascontiguousarray(arrays[name]))
            predictor.run()
            outputs = [np.ascontiguousarray(predictor.get_output(i).numpy()) for i in range(len(out_names))]
            compute_ms = (time.perf_counter() - start) * 1000
        except BadRequest as exc:
            write_message(proto_out, {"ok": False, "error": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001 - Lite raises plain RuntimeError/ValueError on bad shapes
            write_message(proto_out, {"ok": False, "error": "Paddle Lite failed: %s" % exc})
            continue
        described = [
            {"name": n, "dtype": a.dtype.str, "shape": list(a.shape), "nbytes": a.nbytes}
            for n, a in zip(out_names, outputs)
        ]
        write_message(
            proto_out,
            {"ok": True, "outputs": described, "compute_ms": compute_ms},
            b"".join(a.tobytes() for a in outputs),
        )


def main(argv):
    if argv[:1] == ["--version"]:
        print(lite_version())
        return 0
    if len(argv) < 1:
        sys.stderr.write("usage: host.py MODEL.nb | --wait | --version\n")
        return 2
    die_with_parent()
    # Lite's Python MobileConfig has no thread setting: it runs on one thread, as replicas scale out anyway.
    if argv[0] == "--wait":
        return serve(None, wait=True)
    return serve(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
