"""Serve an edge bundle over the Open Inference Protocol v2 with no platform present, and bill it later.

    python -m runtime.lite.edge serve bundle.tar.gz --port 8080 [--data-dir DIR] [--platform URL]
    python -m runtime.lite.edge upload --data-dir DIR [--platform URL]     (one-shot upload of unsent usage)
    python -m runtime.lite.edge verify bundle.tar.gz                       (check it, print bundle.json)
    python -m runtime.lite.edge export MODEL_DIR -o bundle.tar.gz --device-key KEY [--target x86|arm]

The server is ``runtime.server``'s app (same routes, same errors, same ``x-paddlefn-*`` headers) with the
Paddle Lite engine, wrapped in a middleware that writes one usage record per infer request to an append-only
spool and fsyncs it *before* the response leaves: a request that was answered is never lost to a crash.

Spool (DATA_DIR, default ``~/.paddlefn-edge/<bundle_id>``): ``usage.jsonl`` holds one record per line,
``sent.jsonl`` one ``{"request_id": ...}`` per record the platform acknowledged; both are only appended to.

Upload: ``POST {platform}/v1/edge/usage`` with ``Authorization: Bearer <device key>`` and the JSON body
    {"bundle_id": "...", "records": [RECORD, ...]}            (at most UPLOAD_BATCH records per request)
where RECORD is
    {"request_id": "32 hex chars, unique per request: the idempotency key",
     "bundle_id": "...", "model": "<model name>", "engine": "paddle-lite", "device": "edge",
     "started_at": "2026-11-23T10:42:31.123Z" (UTC, when the request arrived),
     "duration_ms": float (arrival to response, in this server), "compute_ms": float (model time),
     "status": int (the HTTP status answered), "bytes_in": int (request body), "bytes_out": int (response body)}
Records are marked sent only when the platform answers 2xx; anything else (or no answer) leaves them for the
next attempt, so the same records may arrive more than once: the platform must count each request_id once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("paddlefn.edge")

UPLOAD_BATCH = 500
USAGE = "usage.jsonl"
SENT = "sent.jsonl"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class UsageSpool:
    """Append-only JSON-lines usage records; safe for one writer thread plus one uploader thread."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for name in (USAGE, SENT):
            self._end_torn_line(folder / name)

    def _end_torn_line(self, path: Path) -> None:
        """A crash mid-write leaves a last line without its newline; end it, or the next record would be
        glued to it and lost with it."""
        if path.exists() and path.stat().st_size:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                self._append(path.name, [])

    def record(self, rec: dict[str, Any]) -> None:
        self._append(USAGE, [rec])

    def mark_sent(self, request_ids: list[str]) -> None:
        if request_ids:
            self._append(SENT, [{"request_id": r} for r in request_ids])

    def records(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.folder / USAGE)

    def unsent(self) -> list[dict[str, Any]]:
        sent = {r.get("request_id") for r in _read_jsonl(self.folder / SENT)}
        return [r for r in self.records() if r.get("request_id") not in sent]

    def _append(self, name: str, rows: list[dict[str, Any]]) -> None:
        # No rows: just a newline (see _end_torn_line).
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode() or b"\n"
        with self._lock:
            fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)  # durable before the caller goes on (before the response is sent)
            finally:
                os.close(fd)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        # A torn last line (crash mid-write) was never fsynced, so its response was never sent: skip it.
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows


class UsageMiddleware:
    """Records every ``.../infer`` request in the spool, durably, before its response starts."""

    def __init__(self, app: Any, spool: UsageSpool, *, bundle_id: str, model: str) -> None:
        self.app, self.spool, self.bundle_id, self.model = app, spool, bundle_id, model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/infer"):
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        started = time.time()
        clock = time.perf_counter()
        bytes_in = 0
        held: list[Message] = []  # response start and body parts, released once the record is on disk
        bytes_out = 0

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            bytes_in += len(message.get("body", b""))
            return message

        async def holding_send(message: Message) -> None:
            nonlocal bytes_out
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-paddlefn-request-id", request_id.encode()))
            held.append(message)
            bytes_out += len(message.get("body", b""))
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                start = held[0]
                headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
                record = {
                    "request_id": request_id,
                    "bundle_id": self.bundle_id,
                    "model": self.model,
                    "engine": "paddle-lite",
                    "device": "edge",
                    "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds")[:-6]
                    + "Z",
                    "duration_ms": round((time.perf_counter() - clock) * 1000, 3),
                    "compute_ms": float(headers.get("x-paddlefn-compute-ms", 0.0)),
                    "status": int(start["status"]),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                }
                await asyncio.to_thread(self.spool.record, record)
                for m in held:
                    await send(m)
                held.clear()

        await self.app(scope, counting_receive, holding_send)


def upload_once(
    spool: UsageSpool, platform_url: str, device_key: str, bundle_id: str, *, timeout_s: float = 30.0
) -> int:
    """POST unsent records to the platform; return how many it acknowledged (raises on transport errors)."""
    import httpx

    pending = spool.unsent()
    sent = 0
    with httpx.Client(timeout=timeout_s) as client:
        for i in range(0, len(pending), UPLOAD_BATCH):
            batch = pending[i : i + UPLOAD_BATCH]
            response = client.post(
                platform_url.rstrip("/") + "/v1/edge/usage",
                json={"bundle_id": bundle_id, "records": batch},
                headers={"authorization": f"Bearer {device_key}"},
            )
            if not response.is_success:
                log.warning("usage upload refused (%s): %s", response.status_code, response.text[:300])
                break
            spool.mark_sent([r["request_id"] for r in batch])
            sent += len(batch)
    return sent


def _uploader(
    stop: threading.Event, spool: UsageSpool, url: str, key: str, bundle_id: str, every_s: float
) -> None:
    """Keeps trying while the server runs (the edge may be offline for days; nothing is dropped meanwhile),
    and once more, briefly, when the server stops."""
    while True:
        stopping = stop.wait(every_s)
        try:
            if spool.unsent():
                sent = upload_once(spool, url, key, bundle_id, timeout_s=5.0 if stopping else 30.0)
                log.info("uploaded %d usage records", sent)
        except Exception as exc:  # offline, DNS, TLS...: try again next round (or next start)
            log.info("usage upload failed, will retry: %s", exc)
        if stopping:
            return


def serve(args: argparse.Namespace) -> int:
    from runtime.engine import EngineError
    from runtime.lite.bundle import BundleError, open_bundle, read_meta
    from runtime.lite.engine import LiteUnavailable
    from runtime.server import LoadOptions, Worker, _bind, create_app

    try:
        meta = read_meta(args.bundle)
        data_dir = args.data_dir or Path.home() / ".paddlefn-edge" / str(meta["bundle_id"])
        opened = open_bundle(args.bundle, data_dir / "model")
    except BundleError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    spool = UsageSpool(data_dir)
    name = args.model_name or str(opened.meta.get("model_name") or "model")
    worker = Worker(use_gpu=False)
    app = UsageMiddleware(create_app(worker), spool, bundle_id=opened.bundle_id, model=name)

    import uvicorn

    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    url = args.platform or opened.meta.get("platform_url")
    stop = threading.Event()
    uploader = threading.Thread(
        target=_uploader,
        args=(stop, spool, url, opened.device_key, opened.bundle_id, args.upload_interval),
        daemon=True,
        name="usage-uploader",
    )

    async def run() -> None:
        await worker.load(name, LoadOptions(model_dir=opened.folder, engine="lite"))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(worker.executor, _golden_check, worker.get(name).engine, opened.folder)
        if url:
            uploader.start()
        # Bind only once the model is proven: a listening port means ready.
        sock = _bind(argparse.Namespace(uds=None, host=args.host, port=args.port))
        log.info("serving %s (bundle %s) on port %s", name, opened.bundle_id, args.port)
        await server.serve(sockets=[sock])

    # uvicorn re-raises SIGTERM after its graceful shutdown; with the default handler that would end the
    # process before the last usage upload below. A no-op handler lets serve() return normally instead.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except (BundleError, EngineError, LiteUnavailable) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    finally:
        stop.set()
        if uploader.is_alive():
            uploader.join(15)  # the last attempt is bounded by its own 5 s timeouts
    return 0


def _golden_check(engine: Any, folder: Path) -> None:
    """Prove this machine's Lite gives the outputs the platform checked (numpy 2, for one, corrupts inputs)."""
    import numpy as np

    from runtime.lite.bundle import BundleError
    from runtime.lite.convert import LITE_ATOL, LITE_RTOL
    from runtime.prepare import compare
    from runtime.spec import GOLDEN_INPUTS, GOLDEN_OUTPUTS

    if not (folder / GOLDEN_INPUTS).exists() or not (folder / GOLDEN_OUTPUTS).exists():
        return
    with np.load(folder / GOLDEN_INPUTS) as i, np.load(folder / GOLDEN_OUTPUTS) as o:
        inputs, reference = {k: i[k] for k in i.files}, {k: o[k] for k in o.files}
    error = compare(engine.infer(inputs), reference, rtol=LITE_RTOL, atol=LITE_ATOL)
    if error:
        raise BundleError(
            f"this machine's Paddle Lite gives wrong outputs on the bundle's golden inputs: {error}"
        )


def upload(args: argparse.Namespace) -> int:
    meta = json.loads((args.data_dir / "model" / "bundle.json").read_text())
    url = args.platform or meta.get("platform_url")
    if not url:
        print("no platform URL: pass --platform", file=sys.stderr)
        return 2
    spool = UsageSpool(args.data_dir)
    sent = upload_once(spool, url, meta["device_key"], meta["bundle_id"])
    left = len(spool.unsent())
    print(json.dumps({"sent": sent, "unsent": left}))
    return 0 if left == 0 else 1


def verify(args: argparse.Namespace) -> int:
    import tempfile

    from runtime.lite.bundle import BundleError, open_bundle

    with tempfile.TemporaryDirectory() as tmp:
        try:
            opened = open_bundle(args.bundle, Path(tmp) / "model")
        except BundleError as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 2
    shown = {k: v for k, v in opened.meta.items() if k != "device_key"}
    print(json.dumps(shown, indent=2))
    return 0


def export(args: argparse.Namespace) -> int:
    from runtime.lite.bundle import BundleError, export_bundle

    try:
        meta = export_bundle(
            args.model_dir,
            args.output,
            device_key=args.device_key,
            target=args.target,
            model_name=args.model_name,
            platform_url=args.platform,
        )
    except BundleError as exc:
        print(f"cannot export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"bundle": str(args.output), "bundle_id": meta["bundle_id"], "target": meta["target"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.lite.edge", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a bundle over OIP v2")
    s.add_argument("bundle", type=Path)
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument(
        "--data-dir", type=Path, help="unpacked model and usage spool (default ~/.paddlefn-edge/ID)"
    )
    s.add_argument("--model-name", help="name to serve under (default: the bundle's model name)")
    s.add_argument("--platform", help="platform base URL for usage upload (default: the bundle's)")
    s.add_argument("--upload-interval", type=float, default=30.0, help="seconds between upload attempts")
    u = sub.add_parser("upload", help="upload unsent usage once")
    u.add_argument("--data-dir", type=Path, required=True)
    u.add_argument("--platform")
    v = sub.add_parser("verify", help="check a bundle without serving it")
    v.add_argument("bundle", type=Path)
    e = sub.add_parser("export", help="write a bundle from a prepared model folder")
    e.add_argument("model_dir", type=Path)
    e.add_argument("-o", "--output", type=Path, required=True)
    e.add_argument("--device-key", required=True)
    e.add_argument("--target", choices=["x86", "arm"], default="x86")
    e.add_argument("--model-name")
    e.add_argument("--platform")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s edge[%(process)d] %(levelname)s %(message)s")
    return {"serve": serve, "upload": upload, "verify": verify, "export": export}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
