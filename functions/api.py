"""The control plane's REST API under ``/v1`` (JSON, ``Authorization: Bearer <key>``).

Admin keys manage tenants; a tenant's ``manage`` keys manage its keys and functions. Another tenant's things
answer 404, as if they did not exist.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.types import Message, Receive

from functions.auth import MANAGE, Principal
from functions.errors import BadRequest, PayloadTooLarge, Unauthorized
from functions.platform import Platform
from functions.store import ApiKey, Tenant

router = APIRouter(prefix="/v1")


def get_platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def get_principal(request: Request) -> Principal | None:
    return get_platform(request).authenticate(request.headers.get("authorization"))


PlatformDep = Annotated[Platform, Depends(get_platform)]
PrincipalDep = Annotated[Principal | None, Depends(get_principal)]


class TenantIn(BaseModel):
    name: str = Field(description="DNS label: lowercase letters, digits and '-', starting with a letter")


class KeyIn(BaseModel):
    name: str = Field("", max_length=100, description="what the key is for")
    scopes: list[str] | None = Field(
        None, description="some of ['invoke', 'manage']; left out or null: both; an empty list is refused"
    )


def actor(principal: Principal | None) -> str:
    return principal.key_id if principal else "anonymous"


def tenant_view(tenant: Tenant, platform: Platform) -> dict[str, Any]:
    return {
        "name": tenant.name,
        "id": tenant.id,  # never reused: a tenant created again under this name gets another
        "plan": tenant.plan,
        "limits": platform.limits_of(tenant.name).model_dump(),
        "usage": platform.tenant_usage(tenant.name),
        "created_at": tenant.created_at.isoformat(),
        "functions": len(platform.registry.of_tenant(tenant.name)),
        "url": f"{platform.settings.base_url}/t/{tenant.name}",
    }


def key_view(row: ApiKey, token: str | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "scopes": sorted(row.scopes.split(",")),
        "created_at": row.created_at.isoformat(),
        "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }
    if token is not None:
        view["key"] = token  # shown once, never stored
    return view


@router.get("/whoami")
def whoami(platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    if principal is None:
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'")
    return {
        "key_id": principal.key_id,
        "tenant": principal.tenant,
        "admin": principal.is_admin,
        "scopes": sorted(principal.scopes),
    }


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantIn, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    platform.require_admin(principal)
    with platform.audit.change(actor(principal), body.name, "tenant.create", body.name):
        tenant, row, key = platform.create_tenant(body.name)
        await platform.tenant_created(body.name)
    return {"tenant": tenant_view(tenant, platform), "key": key_view(row, key.token)}


@router.get("/tenants")
def list_tenants(platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    platform.require_admin(principal)
    return {"tenants": [tenant_view(t, platform) for t in platform.list_tenants()]}


@router.get("/tenants/{tenant}")
def get_tenant(tenant: str, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    platform.tenant_for(principal, tenant, MANAGE)
    return tenant_view(platform.get_tenant(tenant), platform)


@router.delete("/tenants/{tenant}", status_code=204)
async def delete_tenant(tenant: str, platform: PlatformDep, principal: PrincipalDep) -> Response:
    platform.require_admin(principal)
    with platform.audit.change(actor(principal), tenant, "tenant.delete", tenant):
        await platform.delete_tenant(tenant)
    return Response(status_code=204)


@router.post("/tenants/{tenant}/keys", status_code=201)
async def create_key(
    tenant: str, body: KeyIn, platform: PlatformDep, principal: PrincipalDep
) -> dict[str, Any]:
    tenant_id = platform.tenant_for(principal, tenant, MANAGE)
    with platform.audit.change(actor(principal), tenant, "key.create", body.name):
        row, key = platform.create_key(tenant, tenant_id, body.name, body.scopes)
    return key_view(row, key.token)


@router.get("/tenants/{tenant}/keys")
def list_keys(tenant: str, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    tenant_id = platform.tenant_for(principal, tenant, MANAGE)
    return {"keys": [key_view(k) for k in platform.list_keys(tenant_id)]}


@router.delete("/tenants/{tenant}/keys/{key_id}", status_code=204)
def revoke_key(tenant: str, key_id: str, platform: PlatformDep, principal: PrincipalDep) -> Response:
    tenant_id = platform.tenant_for(principal, tenant, MANAGE)
    with platform.audit.change(actor(principal), tenant, "key.revoke", key_id):
        platform.revoke_key(tenant_id, key_id)
    return Response(status_code=204)


UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "model"],
                    "properties": {
                        "name": {"type": "string", "description": "function name (DNS label)"},
                        "model": {"type": "string", "format": "binary", "description": ".tar.gz or .zip"},
                        "config": {"type": "string", "description": "JSON object of FunctionConfig fields"},
                    },
                }
            }
        },
    }
}


@router.post("/tenants/{tenant}/functions", status_code=202, openapi_extra=UPLOAD_DOC)
async def create_function(
    tenant: str, request: Request, platform: PlatformDep, principal: PrincipalDep
) -> Any:
    tenant_id = platform.tenant_for(principal, tenant, MANAGE)
    with platform.audit.change(actor(principal), tenant, "function.create", request.url.path):
        return await _create_function(tenant, tenant_id, request, platform)


async def _create_function(tenant: str, tenant_id: int, request: Request, platform: Platform) -> Any:
    limit = min(platform.settings.max_upload_bytes, platform.limits_of(tenant).max_model_bytes)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        platform.check_upload_size(tenant, int(declared))  # names the plan's limit when that is the one
        raise PayloadTooLarge(f"the upload is {int(declared)} bytes; the limit is {limit}")
    limited = Request(request.scope, _limited(request.receive, limit))
    try:
        form = await limited.form(max_files=1, max_fields=10)
    except MultiPartException as exc:
        raise BadRequest(
            f"send multipart/form-data with fields name, model and config: {exc.message}"
        ) from None
    try:
        name = form.get("name")
        model = form.get("model")
        if not isinstance(name, str) or not name:
            raise BadRequest("missing form field 'name' (the function's name)")
        if not isinstance(model, UploadFile):
            raise BadRequest("missing form file 'model' (the model as .tar.gz or .zip)")
        config = platform.parse_config(_json_object(form.get("config")))
        record = await platform.create_function(tenant, tenant_id, name, model.file, config)
    finally:
        await form.close()
    return platform.function_view(record)


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def receive_limited() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise PayloadTooLarge(f"the upload is over the limit of {limit} bytes")
        return message

    return receive_limited


def _json_object(raw: Any) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        raise BadRequest("form field 'config' must be a JSON object, not a file")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"form field 'config' is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("form field 'config' must be a JSON object such as {\"idle_timeout_s\": 60}")
    return value


@router.get("/tenants/{tenant}/functions")
def list_functions(tenant: str, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    platform.tenant_for(principal, tenant, MANAGE)
    return {"functions": [platform.function_view(f) for f in platform.registry.of_tenant(tenant)]}


@router.get("/tenants/{tenant}/functions/{name}")
def get_function(tenant: str, name: str, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    platform.tenant_for(principal, tenant, MANAGE)
    return platform.function_view(platform.function(tenant, name))


@router.patch("/tenants/{tenant}/functions/{name}")
async def update_function(
    tenant: str, name: str, patch: dict[str, Any], platform: PlatformDep, principal: PrincipalDep
) -> dict[str, Any]:
    platform.tenant_for(principal, tenant, MANAGE)
    with platform.audit.change(actor(principal), tenant, "function.update", name):
        updated = await platform.update_function(platform.function(tenant, name), patch)
    return platform.function_view(updated)


@router.delete("/tenants/{tenant}/functions/{name}", status_code=204)
async def delete_function(tenant: str, name: str, platform: PlatformDep, principal: PrincipalDep) -> Response:
    platform.tenant_for(principal, tenant, MANAGE)
    with platform.audit.change(actor(principal), tenant, "function.delete", name):
        await platform.delete_function(platform.function(tenant, name))
    return Response(status_code=204)


@router.get("/capacity")
def capacity(platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    """Worker slots and which functions are warm (admin)."""
    platform.require_admin(principal)
    warm = [
        {
            "tenant": f.tenant,
            "function": f.name,
            "replicas": platform.backend.replicas(f),
            "ready": platform.backend.replica_info(f),
        }
        for f in platform.registry.ready()
        if platform.backend.replicas(f)
    ]
    result: dict[str, Any] = {"workers": platform.backend.capacity(), "warm": warm}
    memory = getattr(platform.backend, "memory", None)
    if memory is not None:  # the embedded backend: warm workers are bounded by a memory budget
        result["memory"] = memory()
    return result


MAX_ID = 2**63 - 1  # the largest id the database holds: a bigger one is a 400, not a database error
AuditFormat = Annotated[Literal["json", "jsonl"], Query(description="json, or jsonl to export")]
AuditLimit = Annotated[int, Query(ge=1, le=100_000, description="newest entries to return")]


@router.get("/tenants/{tenant}/audit", response_model=None)
def tenant_audit(
    tenant: str,
    platform: PlatformDep,
    principal: PrincipalDep,
    format: AuditFormat = "json",
    limit: AuditLimit = 1000,
) -> Any:
    """The tenant's own audit entries (JSON, or JSON lines with ?format=jsonl)."""
    tenant_id = platform.tenant_for(principal, tenant, MANAGE)
    return _audit_answer(platform.audit.entries(tenant_id=tenant_id, limit=limit), format)


@router.get("/audit", response_model=None)
def all_audit(
    platform: PlatformDep,
    principal: PrincipalDep,
    tenant: Annotated[str | None, Query(description="every tenant ever of this name")] = None,
    tenant_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="one tenant, also a deleted one")
    ] = None,
    format: AuditFormat = "json",
    limit: AuditLimit = 1000,
) -> Any:
    """Every audit entry, or one tenant's (admin)."""
    platform.require_admin(principal)
    return _audit_answer(platform.audit.entries(tenant, limit=limit, tenant_id=tenant_id), format)


def _audit_answer(entries: list[dict[str, Any]], format: str) -> Any:
    if format == "jsonl":
        return Response("".join(json.dumps(e) + "\n" for e in entries), media_type="application/jsonl")
    return {"entries": entries}
