"""Edge bundles as the platform sees them: export with a per-bundle device key, and usage uploads billed once.

    POST   /v1/tenants/{t}/functions/{fn}/edge-bundles   (manage) body {"target": "x86"|"arm"}
           -> 201, the bundle itself (application/gzip); headers x-paddlefn-bundle-id, x-paddlefn-device-key
    GET    /v1/tenants/{t}/edge-devices                  (manage) the tenant's bundles (never their keys)
    DELETE /v1/tenants/{t}/edge-devices/{bundle_id}      (manage) revoke a bundle's key: its uploads get 401
    POST   /v1/edge/usage                                (the bundle's device key) usage records, see below

A device key reads ``pfe_<bundle id>_<secret>``; only a SHA-256 of the secret is stored (table ``edge_devices``),
and the key is shown once: in the response header, and inside the bundle (the edge server uploads with it).

Usage (``runtime.lite.edge`` sends it): ``{"bundle_id": "...", "records": [...]}``, at most 500 records, each
``{"request_id": 32 hex, "started_at": ISO 8601, "duration_ms", "compute_ms", "status", "bytes_in", "bytes_out",
...}``, every value in the range ``functions/edge_records.py`` documents (an upload with one outside is a 400 naming
it). Every record becomes one ledger row of the bundle's tenant and function with device class ``edge`` and source
``edge:<bundle id>``, billed iff its status is 2xx; a request id already in the tenant's ledger is not counted again
(the edge retries until it gets a 2xx; another tenant's record of the same id is that tenant's), and the answer says
how many records were new and how many duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import secrets
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from starlette.background import BackgroundTask
from starlette.responses import FileResponse

from functions import edge_records, names
from functions.api import PlatformDep, PrincipalDep
from functions.auth import MANAGE, hash_secret
from functions.billing.ledger import row_of
from functions.bounds import clip
from functions.edge_records import MAX_BODY_BYTES, MAX_RECORDS, EdgeRecord
from functions.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, Unauthorized
from functions.platform import Platform
from functions.registry import READY
from functions.store import EdgeDevice, Tenant
from functions.store.models import utcnow
from functions.usage import UsageEvent

router = APIRouter(prefix="/v1")

KEY_HEADER = "x-paddlefn-device-key"
BUNDLE_HEADER = "x-paddlefn-bundle-id"
_KEY = re.compile(r"pfe_(e[0-9a-f]{10})_([A-Za-z0-9_-]{20,})")  # matched whole (fullmatch)


class BundleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: Literal["x86", "arm"] = Field("x86", description="CPU of the edge device")


@router.post("/tenants/{tenant}/functions/{name}/edge-bundles", status_code=201, response_class=Response)
async def create_bundle(
    tenant: str, name: str, body: BundleIn, platform: PlatformDep, principal: PrincipalDep
) -> Response:
    """A new edge bundle of the function (its Paddle Lite ``.nb`` for TARGET) with its own device key."""
    tenant_id = platform.tenant_for(principal, tenant, MANAGE)
    actor = principal.key_id if principal else "anonymous"
    with platform.audit.change(actor, tenant, "edge.export", f"{name} ({body.target})"):
        fn = platform.function(tenant, name)
        if fn.status != READY or fn.manifest is None:
            raise Conflict(f"function {fn.label} is {fn.status}; export it once it is ready")
        lite = fn.manifest.lite or {}
        if not lite.get("available"):
            raise BadRequest(
                f"function {fn.label} has no Paddle Lite version, so it cannot run on an edge device: "
                f"{lite.get('reason') or 'deploy did not convert it'}"
            )
        bundle_id = "e" + secrets.token_hex(5)  # short: the ledger's source column holds "edge:<bundle id>"
        secret = secrets.token_urlsafe(32)
        device_key = f"pfe_{bundle_id}_{secret}"
        out = platform.settings.data_dir / "tmp" / f"edge-{bundle_id}.tar.gz"
        from runtime.lite.bundle import BundleError, export_bundle

        try:
            await asyncio.to_thread(
                export_bundle, fn.serving_dir, out, device_key=device_key, target=body.target,
                bundle_id=bundle_id, model_name=fn.name, platform_url=platform.settings.base_url,
                function={"tenant": fn.tenant, "name": fn.name, "version": fn.version},
            )  # fmt: skip
        except BundleError as exc:
            out.unlink(missing_ok=True)
            raise BadRequest(str(exc)) from None
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        lite_version = clip(str(lite.get("version", "")), 16)
        with platform.store.session() as s:
            s.add(EdgeDevice(bundle_id=bundle_id, tenant_id=tenant_id, function=fn.name, target=body.target,
                             secret_hash=hash_secret(secret), lite_version=lite_version))  # fmt: skip
    return FileResponse(
        out,
        status_code=201,
        media_type="application/gzip",
        filename=names.file_name(f"{fn.name}-{bundle_id}.tar.gz"),
        headers={KEY_HEADER: device_key, BUNDLE_HEADER: bundle_id, "cache-control": "no-store"},
        background=BackgroundTask(_remove, out),
    )


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def device_view(row: EdgeDevice) -> dict[str, Any]:
    return {
        "bundle_id": row.bundle_id,
        "function": row.function,
        "target": row.target,
        "lite_version": row.lite_version,
        "created_at": row.created_at.isoformat(),
        "last_upload_at": row.last_upload_at.isoformat() if row.last_upload_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }


@router.get("/tenants/{tenant}/edge-devices")
def list_devices(tenant: str, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    tenant_id = platform.tenant_for(principal, tenant, MANAGE)
    with platform.store.session() as s:
        rows = s.scalars(
            select(EdgeDevice).where(EdgeDevice.tenant_id == tenant_id).order_by(EdgeDevice.created_at)
        )
        return {"devices": [device_view(r) for r in rows]}


@router.delete("/tenants/{tenant}/edge-devices/{bundle_id}", status_code=204)
def revoke_device(tenant: str, bundle_id: str, platform: PlatformDep, principal: PrincipalDep) -> Response:
    tenant_id = platform.tenant_for(principal, tenant, MANAGE)
    actor = principal.key_id if principal else "anonymous"
    with platform.audit.change(actor, tenant, "edge.revoke", bundle_id), platform.store.session() as s:
        row = s.get(EdgeDevice, bundle_id)
        if row is None or row.tenant_id != tenant_id or row.revoked_at is not None:
            raise NotFound(f"edge device '{bundle_id}' not found")
        row.revoked_at = utcnow()
    return Response(status_code=204)


def authenticate_device(platform: Platform, authorization: str | None) -> tuple[EdgeDevice, str]:
    """The bundle a device key belongs to and its tenant's name; 401 for anything else."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send the bundle's device key as 'Authorization: Bearer <device key>'")
    match = _KEY.fullmatch(token.strip())
    row = tenant = None
    if match:
        with platform.store.session() as s:
            found = s.execute(
                select(EdgeDevice, Tenant.name)
                .join(Tenant, EdgeDevice.tenant_id == Tenant.id)
                .where(EdgeDevice.bundle_id == match.group(1))
                # A device older than its tenant is a deleted tenant's whose id was reused: SQLite did reuse ids
                # before migration 0005 made them unique for good, so a database from then may hold one.
                .where(Tenant.created_at <= EdgeDevice.created_at)
            ).first()
        if found is not None:
            row, tenant = found
    stored = row.secret_hash if row is not None else "0" * 64
    secret = match.group(2) if match else ""
    if not hmac.compare_digest(hash_secret(secret), stored) or row is None or tenant is None:
        raise Unauthorized("device key is not valid (mistyped, or its bundle is unknown to this platform)")
    if row.revoked_at is not None:
        raise Unauthorized(f"the device key of bundle {row.bundle_id} was revoked; export a new bundle")
    return row, tenant


@router.post("/edge/usage")
async def upload_usage(request: Request, platform: PlatformDep) -> dict[str, Any]:
    """Usage records of an edge server, authenticated by its bundle's device key; idempotent by (tenant,
    request id)."""
    device, tenant = authenticate_device(platform, request.headers.get("authorization"))
    records = edge_records.records_of(await _read_json(request), device.bundle_id, now=utcnow())
    rows = [_row(record, tenant, device) for record in records]
    new = await platform.ledger.add_external(rows) if rows else 0
    with platform.store.session() as s:
        s.execute(
            update(EdgeDevice).where(EdgeDevice.bundle_id == device.bundle_id).values(last_upload_at=utcnow())
        )
    return {"bundle_id": device.bundle_id, "received": len(rows), "new": new, "duplicates": len(rows) - new}


async def _read_json(request: Request) -> Any:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(
                f"the upload is over {MAX_BODY_BYTES} bytes; send at most {MAX_RECORDS} records"
            )
        chunks.append(chunk)
    return edge_records.parse(b"".join(chunks))


def _row(record: EdgeRecord, tenant: str, device: EdgeDevice) -> dict[str, Any]:
    event = UsageEvent(
        request_id=record.request_id,
        tenant_id=device.tenant_id,
        tenant=tenant,
        function=device.function,
        started_at=record.started_at,  # in UTC: EdgeRecord converts it
        duration_ms=record.duration_ms,
        compute_ms=record.compute_ms,
        device="edge",
        cold_start=False,
        status=record.status,
        bytes_in=record.bytes_in,
        bytes_out=record.bytes_out,
    )
    return row_of(event, source=f"edge:{device.bundle_id}")
