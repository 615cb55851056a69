"""The audit log: every change to tenants, keys, plans and functions, and the platform's own sleep/wake
decisions, with time, actor (key id or ``system``), tenant, action, target and outcome.

Entries name their tenant and carry its id: a tenant created under a deleted one's name has a new id, and sees
only its own entries; the admin reads the deleted one's by its id (or every tenant's of a name, by the name).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import select

from functions.bounds import clip
from functions.errors import PlatformError
from functions.store import AuditEntry, Store, Tenant
from functions.store.models import utcnow

log = logging.getLogger("paddlefn.audit")
SYSTEM = "system"
MAX_DETAIL_CHARS = 2000


class AuditLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: set[asyncio.Future[None]] = set()

    def record(self, actor: str, tenant: str | None, action: str, target: str = "", outcome: str = "ok",
               detail: str = "", tenant_id: int | None = None) -> None:  # fmt: skip
        """TENANT_ID defaults to that of the tenant named TENANT now (None if there is none). Every string is cut
        to its column's length (a refused create names a tenant that may be any string)."""
        with self.store.session() as s:
            if tenant_id is None and tenant is not None:
                tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == tenant))
            s.add(AuditEntry(at=utcnow(), actor=clip(actor, 32), tenant=None if tenant is None else clip(tenant, 63),
                             tenant_id=tenant_id, action=clip(action, 40), target=clip(target, 200),
                             outcome=clip(outcome, 16), detail=clip(detail, MAX_DETAIL_CHARS)))  # fmt: skip

    def tenant_id(self, tenant: str | None) -> int | None:
        if tenant is None:
            return None
        with self.store.session() as s:
            return s.scalar(select(Tenant.id).where(Tenant.name == tenant))

    def record_soon(
        self, actor: str, tenant: str | None, action: str, target: str = "", detail: str = ""
    ) -> None:
        """From the request path (a wake-up): written off the event loop, so the request does not wait for it."""
        future = asyncio.get_running_loop().run_in_executor(None, self.record, actor, tenant, action, target, "ok",
                                                            detail)  # fmt: skip
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    @contextlib.contextmanager
    def change(self, actor: str, tenant: str | None, action: str, target: str = "") -> Iterator[None]:
        """Record the change made inside the block: ``ok``, ``refused`` (a 4xx) or ``failed``. It is the tenant's
        that existed when the block began (a delete is the deleted tenant's), or else the one it created."""
        tenant_id = self.tenant_id(tenant)
        try:
            yield
        except PlatformError as exc:
            outcome = "refused" if exc.status < 500 else "failed"
            self.record(actor, tenant, action, target, outcome, exc.message, tenant_id=tenant_id)
            raise
        except Exception as exc:
            self.record(actor, tenant, action, target, "failed", repr(exc), tenant_id=tenant_id)
            raise
        self.record(actor, tenant, action, target, tenant_id=tenant_id)

    def entries(
        self,
        tenant: str | None = None,
        since: datetime | None = None,
        limit: int = 1000,
        *,
        tenant_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """The newest LIMIT entries, oldest first: of the tenant TENANT_ID, of every tenant named TENANT, or all."""
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if tenant is not None:
            query = query.where(AuditEntry.tenant == tenant)
        if tenant_id is not None:
            query = query.where(AuditEntry.tenant_id == tenant_id)
        if since is not None:
            query = query.where(AuditEntry.at >= since)
        with self.store.session() as s:
            rows = list(s.scalars(query))
        return [
            {
                "id": r.id,
                "at": r.at.isoformat(),
                "actor": r.actor,
                "tenant": r.tenant,
                "tenant_id": r.tenant_id,
                "action": r.action,
                "target": r.target,
                "outcome": r.outcome,
                "detail": r.detail,
            }
            for r in reversed(rows)
        ]
