"""The audit log: every change to tenants, keys, plans and functions, and the platform's own sleep/wake
decisions, with time, actor (key id or ``system``), tenant, action, target and outcome."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import select

from functions.errors import PlatformError
from functions.store import AuditEntry, Store
from functions.store.models import utcnow

log = logging.getLogger("paddlefn.audit")
SYSTEM = "system"


class AuditLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: set[asyncio.Future[None]] = set()

    def record(self, actor: str, tenant: str | None, action: str, target: str = "", outcome: str = "ok",
               detail: str = "") -> None:  # fmt: skip
        with self.store.session() as s:
            s.add(AuditEntry(at=utcnow(), actor=actor, tenant=tenant, action=action, target=target[:200],
                             outcome=outcome, detail=detail[:2000]))  # fmt: skip

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
        """Record the change made inside the block: ``ok``, ``refused`` (a 4xx) or ``failed``."""
        try:
            yield
        except PlatformError as exc:
            self.record(
                actor, tenant, action, target, "refused" if exc.status < 500 else "failed", exc.message
            )
            raise
        except Exception as exc:
            self.record(actor, tenant, action, target, "failed", repr(exc))
            raise
        self.record(actor, tenant, action, target)

    def entries(
        self, tenant: str | None, since: datetime | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if tenant is not None:
            query = query.where(AuditEntry.tenant == tenant)
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
                "action": r.action,
                "target": r.target,
                "outcome": r.outcome,
                "detail": r.detail,
            }
            for r in reversed(rows)
        ]
