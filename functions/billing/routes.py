"""Billing endpoints: usage, invoices (JSON and CSV) and plans (prices and limits); and, for the admin, the
deleted tenants, whose invoices stay readable by tenant id (a new tenant of the same name starts empty)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel
from sqlalchemy import select

from functions import names
from functions.api import MAX_ID, PlatformDep, PrincipalDep
from functions.auth import MANAGE
from functions.billing import invoices
from functions.billing.service import Account
from functions.bounds import shown
from functions.errors import BadRequest, NotFound
from functions.platform import Platform
from functions.store import DeletedTenant

router = APIRouter(prefix="/v1", tags=["billing"])


def _time(value: str | None, name: str) -> datetime | None:
    """ISO 8601 with a zone (``Z`` accepted); a bare date means midnight UTC."""
    if value is None or value == "":
        return None
    text = value + "T00:00:00+00:00" if len(value) == 10 else value.replace("Z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{name}={shown(value)} is not a time: use ISO 8601 such as 2026-11-01T00:00:00Z"
        ) from None
    if moment.tzinfo is None:
        return moment  # Billing.usage says a zone is needed
    try:
        return moment.astimezone(UTC)  # here, where the parameter's name is known, not in the database driver
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is in year 0 in UTC
        raise BadRequest(
            f"{name}={value!r} is outside years 1 to 9999 once its zone offset is applied; give it in UTC"
        ) from None


@router.get("/tenants/{tenant}/usage")
async def usage(
    tenant: str,
    platform: PlatformDep,
    principal: PrincipalDep,
    start: Annotated[str | None, Query(description="ISO 8601, default: start of this month (UTC)")] = None,
    end: Annotated[str | None, Query(description="ISO 8601, exclusive, default: now")] = None,
    group_by: Annotated[str, Query(description="function, device, day or hour")] = "function",
) -> dict[str, Any]:
    account = Account(platform.tenant_for(principal, tenant, MANAGE), tenant, platform.plan_of(tenant))
    return await platform.billing.usage(account, _time(start, "start"), _time(end, "end"), group_by)


@router.get("/tenants/{tenant}/invoices/{period}", response_model=None)
async def invoice(
    tenant: str,
    period: str,
    platform: PlatformDep,
    principal: PrincipalDep,
    format: Annotated[str, Query(description="json or csv")] = "json",
) -> dict[str, Any] | Response:
    account = Account(platform.tenant_for(principal, tenant, MANAGE), tenant, platform.plan_of(tenant))
    return await _invoice(platform, account, period, format)


async def _invoice(
    platform: Platform, account: Account, period: str, format: str
) -> dict[str, Any] | Response:
    if format not in ("json", "csv"):
        raise BadRequest("format must be json or csv")
    document = await platform.billing.invoice(account, period)
    if format == "csv":
        filename = names.file_name(f"invoice-{account.name}-{period}.csv")
        return PlainTextResponse(invoices.to_csv(document), media_type="text/csv",
                                 headers={"content-disposition": f'attachment; filename="{filename}"'})  # fmt: skip
    return document


@router.get("/deleted-tenants")
def deleted_tenants(platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    """Tenants deleted so far, newest first, with the ids their invoices and audit entries are kept under."""
    platform.require_admin(principal)
    with platform.store.session() as s:
        rows = list(s.scalars(select(DeletedTenant).order_by(DeletedTenant.id.desc())))
    return {"tenants": [{"id": r.id, "name": r.name, "plan": r.plan,
                         "created_at": r.created_at.isoformat() if r.created_at else None,
                         "deleted_at": r.deleted_at.isoformat() if r.deleted_at else None} for r in rows]}  # fmt: skip


@router.get("/deleted-tenants/{tenant_id}/invoices/{period}", response_model=None)
async def deleted_tenant_invoice(
    tenant_id: Annotated[int, PathParam(ge=1, le=MAX_ID, description="the deleted tenant's id")],
    period: str,
    platform: PlatformDep,
    principal: PrincipalDep,
    format: Annotated[str, Query(description="json or csv")] = "json",
) -> dict[str, Any] | Response:
    """A deleted tenant's invoice, priced by the plan it had (admin)."""
    platform.require_admin(principal)
    with platform.store.session() as s:
        row = s.get(DeletedTenant, tenant_id)
    if row is None:
        raise NotFound(f"no deleted tenant has id {tenant_id} (GET /v1/deleted-tenants lists them)")
    return await _invoice(platform, Account(row.id, row.name, row.plan), period, format)


class PlanIn(BaseModel):
    plan: str


@router.get("/plans")
def list_plans(platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    platform.require_admin(principal)
    return {"plans": {name: plan.model_dump() for name, plan in platform.plans.all().items()}}


@router.put("/plans/{name}")
def put_plan(
    name: str, body: dict[str, Any], platform: PlatformDep, principal: PrincipalDep
) -> dict[str, Any]:
    platform.require_admin(principal)
    with platform.audit.change(principal.key_id if principal else "", None, "plan.put", name):
        return {"name": name, **platform.put_plan(name, body).model_dump()}


@router.put("/tenants/{tenant}/plan")
def set_plan(tenant: str, body: PlanIn, platform: PlatformDep, principal: PrincipalDep) -> dict[str, Any]:
    platform.require_admin(principal)
    with platform.audit.change(principal.key_id if principal else "", tenant, "tenant.plan", body.plan):
        platform.set_plan(tenant, body.plan)
    return {"tenant": tenant, "plan": body.plan}
