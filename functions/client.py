"""A small client of the control plane, used by the CLI (and handy in scripts and tests)."""

from __future__ import annotations

import io
import socket
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx


class ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Client:
    def __init__(self, url: str, key: str | None, timeout: float = 60.0) -> None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        # TCP_NODELAY, as urllib3 and most OIP clients set it: without it a request after a small one can wait
        # ~40 ms for a delayed ACK.
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ClientError(
                0, f"cannot reach the platform at {self.url}: is `paddlefn up` running?"
            ) from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text or response.reason_phrase
            raise ClientError(response.status_code, str(message))
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # tenants and keys
    def create_tenant(self, name: str) -> Any:
        return self.request("POST", "/v1/tenants", json={"name": name})

    def list_tenants(self) -> Any:
        return self.request("GET", "/v1/tenants")["tenants"]

    def delete_tenant(self, name: str) -> None:
        self.request("DELETE", f"/v1/tenants/{name}")

    def create_key(self, tenant: str, name: str = "", scopes: list[str] | None = None) -> Any:
        return self.request("POST", f"/v1/tenants/{tenant}/keys", json={"name": name, "scopes": scopes})

    def list_keys(self, tenant: str) -> Any:
        return self.request("GET", f"/v1/tenants/{tenant}/keys")["keys"]

    def revoke_key(self, tenant: str, key_id: str) -> None:
        self.request("DELETE", f"/v1/tenants/{tenant}/keys/{key_id}")

    # functions
    def deploy(
        self,
        tenant: str,
        name: str,
        model: Path,
        config: dict[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        import json

        archive = open_archive(model)
        size = archive.seek(0, io.SEEK_END)
        archive.seek(0)
        upload = _Progress(archive, size, progress) if progress else archive
        files = {
            "model": (f"{name}.tar.gz" if model.is_dir() else model.name, upload, "application/octet-stream")
        }
        data = {"name": name, "config": json.dumps(config or {})}
        return self.request("POST", f"/v1/tenants/{tenant}/functions", data=data, files=files, timeout=600)

    def function(self, tenant: str, name: str) -> Any:
        return self.request("GET", f"/v1/tenants/{tenant}/functions/{name}")

    def functions(self, tenant: str) -> Any:
        return self.request("GET", f"/v1/tenants/{tenant}/functions")["functions"]

    def update_function(self, tenant: str, name: str, patch: dict[str, Any]) -> Any:
        return self.request("PATCH", f"/v1/tenants/{tenant}/functions/{name}", json=patch)

    def delete_function(self, tenant: str, name: str) -> None:
        self.request("DELETE", f"/v1/tenants/{tenant}/functions/{name}")

    def wait_deployed(self, tenant: str, name: str, timeout: float = 600.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            fn = self.function(tenant, name)
            if fn["status"] != "deploying" or time.monotonic() > deadline:
                return fn
            time.sleep(0.25)

    def infer(self, tenant: str, name: str, body: dict[str, Any]) -> Any:
        return self.request("POST", f"/t/{tenant}/v2/models/{name}/infer", json=body)

    # edge bundles
    def export_edge_bundle(self, tenant: str, name: str, target: str, out: Path) -> dict[str, str]:
        """Write a new edge bundle of TENANT/NAME to OUT; returns its bundle id and device key (shown once)."""
        path = f"/v1/tenants/{tenant}/functions/{name}/edge-bundles"
        partial = out.with_name(out.name + ".partial")
        try:
            with self.http.stream("POST", path, json={"target": target}, timeout=600) as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        message = response.json().get("error") or response.text
                    except ValueError:
                        message = response.text
                    raise ClientError(response.status_code, str(message))
                out.parent.mkdir(parents=True, exist_ok=True)
                with partial.open("wb") as sink:
                    for chunk in response.iter_bytes():
                        sink.write(chunk)
                key, bundle_id = (
                    response.headers["x-paddlefn-device-key"],
                    response.headers["x-paddlefn-bundle-id"],
                )
        except httpx.ConnectError:
            raise ClientError(
                0, f"cannot reach the platform at {self.url}: is `paddlefn up` running?"
            ) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(out)  # never half a bundle under OUT's name
        return {"bundle_id": bundle_id, "device_key": key, "path": str(out)}

    def edge_devices(self, tenant: str) -> Any:
        return self.request("GET", f"/v1/tenants/{tenant}/edge-devices")["devices"]

    def revoke_edge_device(self, tenant: str, bundle_id: str) -> None:
        self.request("DELETE", f"/v1/tenants/{tenant}/edge-devices/{bundle_id}")

    # who the key is, capacity, per-minute stats
    def whoami(self) -> Any:
        return self.request("GET", "/v1/whoami")

    def capacity(self) -> Any:
        return self.request("GET", "/v1/capacity")

    def stats(self, tenant: str, name: str, minutes: int = 60) -> Any:
        return self.request(
            "GET", f"/v1/tenants/{tenant}/functions/{name}/stats", params={"minutes": minutes}
        )

    # billing
    def usage(self, tenant: str, start: str | None, end: str | None, group_by: str) -> Any:
        params = {k: v for k, v in (("start", start), ("end", end), ("group_by", group_by)) if v}
        return self.request("GET", f"/v1/tenants/{tenant}/usage", params=params)

    def invoice(self, tenant: str, period: str) -> Any:
        return self.request("GET", f"/v1/tenants/{tenant}/invoices/{period}")

    def invoice_csv(self, tenant: str, period: str) -> str:
        response = self.http.get(f"/v1/tenants/{tenant}/invoices/{period}", params={"format": "csv"})
        if response.status_code >= 400:
            raise ClientError(response.status_code, response.json().get("error", response.text))
        return response.text


def open_archive(model: Path) -> IO[bytes]:
    """An archive to upload: the file itself, or a folder packed as .tar.gz in memory."""
    if not model.exists():
        raise ClientError(0, f"{model} does not exist")
    if model.is_file():
        return model.open("rb")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(model.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=str(path.relative_to(model)))
    buffer.seek(0)
    return buffer


class _Progress(io.RawIOBase):
    """Reports bytes read, so an upload can show a progress bar."""

    def __init__(self, inner: IO[bytes], total: int, callback: Callable[[int, int], None]) -> None:
        self.inner, self.total, self.callback, self.done = inner, total, callback, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self.inner.read(size)
        self.done += len(chunk)
        self.callback(self.done, self.total)
        return chunk
