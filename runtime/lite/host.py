"""Paddle Lite engine host: loads one ``.nb`` and runs tensors it receives on stdin, answering on stdout.

Runs under the Lite interpreter (CPython 3.7, ``paddlelite==2.12``, numpy<2; see DESIGN.md), so this file keeps
to 3.7 syntax and imports only the stdlib, numpy and paddlelite. Everything else (OIP, batching, metering) stays
in the platform's modern environment; ``runtime.lite.engine`` is the other end of the pipe.

Framing, both directions: an 8-byte big-endian header ``>II`` (JSON length, payload length), the JSON, then
the payload (raw tensor bytes, C order, back to back).
- infer request:  {"op": "infer", "inputs": [{"name", "dtype", "shape", "nbytes"}, ...]} + tensor bytes
- reply:          {"ok": true, "outputs": [{"name", "dtype", "shape", "nbytes"}, ...], "compute_ms"} + bytes
                  or {"ok": false, "error": "..."} (no payload); the host stays up after a bad request.
- the first message the host writes is {"ok": true, "ready": true, "lite_version", "inputs", "outputs",
  "load_ms"} or, when the model cannot be loaded, {"ok": false, "error"} before it exits with status 1.
Requests are served one at a time. The host exits when stdin closes (the parent is gone or closed the pipe)
and, on Linux, when its parent dies (PR_SET_PDEATHSIG), even while inside a Lite call.

``python host.py --version`` prints the installed Paddle Lite version and exits.
"""

import json
import os
import signal
import struct
import sys
import time

FRAME = struct.Struct(">II")
MAX_JSON = 16 * 1024 * 1024


def die_with_parent():
    # The signal follows the *thread* that started us: engines start hosts from the worker's single, long-lived
    # engine thread, which ends only when the worker does. stdin EOF covers every orderly exit.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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


def serve(nb_path):
    # Lite and glog may print to fd 1: keep the real stdout for the protocol and send fd 1 to stderr.
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    proto_in = os.fdopen(os.dup(0), "rb")
    started = time.time()
    try:
        import numpy as np
        from paddlelite import lite

        config = lite.MobileConfig()
        config.set_model_from_file(nb_path)
        predictor = lite.create_paddle_predictor(config)
        in_names = list(predictor.get_input_names())
        out_names = list(predictor.get_output_names())
    except Exception as exc:  # noqa: BLE001 - any load failure is reported, then the host exits
        write_message(proto_out, {"ok": False, "error": "cannot load %s: %s" % (os.path.basename(nb_path), exc)})
        return 1
    write_message(
        proto_out,
        {
            "ok": True,
            "ready": True,
            "lite_version": lite_version(),
            "inputs": in_names,
            "outputs": out_names,
            "load_ms": (time.time() - started) * 1000,
        },
    )
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
        sys.stderr.write("usage: host.py MODEL.nb | --version\n")
        return 2
    die_with_parent()
    # Lite's Python MobileConfig has no thread setting: it runs on one thread, as replicas scale out anyway.
    return serve(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
