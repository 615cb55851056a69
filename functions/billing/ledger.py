"""The usage ledger: every request that reached a function, exactly once, durable before its response leaves.

``record`` (on the request path) appends to the journal and returns: one ``write(2)``, no database round trip, so it
adds microseconds to a request. A background task moves journal batches into ``usage_records`` every
``flush_interval_s`` with ``INSERT ... ON CONFLICT (tenant_id, request_id) DO NOTHING``: replaying a batch (after a
crash, after a failed commit) never counts a request twice. A request id is unique within its tenant only: an edge
device picks its own, so another tenant's use of the same id must neither suppress nor be suppressed. Queries flush
first, so they see every answered request.

Concurrency: no lock is shared between tenants. The journal's batches are sealed on the event loop (no await
between taking the buffer and rotating the file) and each batch is committed by one task that every flush needing
it awaits, so a read of tenant B waits only for batches holding B's records, never for A's edge uploads. Inserts
need no lock: the database's unique key makes a repeated one a no-op. The one race the database does not settle
is closing a month, which reads its lines and then writes its invoice in two transactions: an edge upload of the
same tenant committing in between would land in a month already invoiced, and never be billed. A lock per tenant
covers exactly that (close_period and add_external of that tenant); making the database do it would take a
serializable transaction on PostgreSQL and a write lock held across a read on SQLite.

Records belong to a tenant by id (``tenant_id``), not by name: a tenant created under a deleted one's name has a
new id, so it starts with no usage and no invoices, while the deleted one's stay readable under its own id.

Periods: a record belongs to the invoice month of its start time, unless that month's invoice has closed (its
month ended more than ``grace`` ago, whether or not anyone has read the invoice yet, or it was frozen): then it
goes to the open month, the one in which it arrived, since a closed invoice never changes. A late edge upload, a
record replayed after the close, or one an edge dated 2001 is billed now, and no invoice of a long-closed month
is frozen with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from functions.billing.journal import Journal, JournalError, read
from functions.billing.periods import is_over, period_of
from functions.billing.pricing import billed_ms
from functions.errors import Unavailable
from functions.store import DeletedTenant, Invoice, Store, Tenant, UsageRecord
from functions.store.models import utcnow
from functions.usage import UsageEvent

log = logging.getLogger("paddlefn.billing")

GROUPS = ("function", "day", "hour", "device")


def row_of(event: UsageEvent, source: str = "gateway") -> dict[str, Any]:
    """The ledger row of EVENT, in integers (microseconds, milliseconds, bytes)."""
    return {
        "request_id": event.request_id,
        "tenant_id": event.tenant_id,
        "tenant": event.tenant,
        "function": event.function,
        "started_at": event.started_at.astimezone(UTC).isoformat(),
        "duration_us": max(0, round(event.duration_ms * 1000)),
        # compute_us is for people; the bill rounds up the reported value itself (pricing.billed_ms).
        "compute_us": max(0, round(event.compute_ms * 1000)),
        "billed_ms": billed_ms(event.compute_ms) if event.billable else 0,
        "device": event.device,
        "cold_start": event.cold_start,
        "status": event.status,
        "billable": event.billable,
        "bytes_in": event.bytes_in,
        "bytes_out": event.bytes_out,
        "source": source,
    }


@dataclass(eq=False)
class _Batch:
    """Rows sealed into one journal file and committed together; the file is deleted once they are."""

    path: Path
    rows: list[dict[str, Any]]
    tenants: frozenset[int]
    # The commit in flight (or done), which every flush needing this batch awaits; None before the first try
    # and after a failed one.
    commit: asyncio.Task[int] | None = None


@dataclass
class Line:
    """Billable usage of one function on one device class in one period."""

    function: str
    device: str
    requests: int
    billed_ms: int


class Ledger:
    """A ``UsageSink`` (see functions/usage.py) backed by the journal and the store."""

    def __init__(
        self,
        store: Store,
        folder: Path,
        *,
        on_billed: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
        flush_interval_s: float = 0.1,
        grace: timedelta = timedelta(hours=1),
    ) -> None:
        self.store = store
        self.folder = folder
        self.on_billed = (
            on_billed  # e.g. Prometheus counters of billed requests, to reconcile with the ledger
        )
        self.clock = clock
        self.flush_interval_s = flush_interval_s
        self.grace = grace  # how long after its month ends an invoice closes (PADDLEFN_INVOICE_GRACE_S)
        self._journal: Journal | None = None
        self._buffer: list[dict[str, Any]] = []
        self._batches: list[_Batch] = []  # sealed, not yet committed
        self._tenant_locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)  # see the docstring
        self._closed: set[tuple[int, str]] = set()  # (tenant id, period) of frozen invoices
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        with self.store.session() as s:
            self._closed = {(t, p) for t, p in s.execute(select(Invoice.tenant_id, Invoice.period))}
        journal = Journal(self.folder)
        leftovers = [p for p in journal.files() if p != journal.path]
        for path in leftovers:  # what a crash left behind: replay, idempotently
            rows = await asyncio.to_thread(read, path)
            log.info("replaying %d usage records from %s", len(rows), path.name)
            await asyncio.to_thread(self._insert, rows)
            path.unlink()
        self._journal = journal
        self._task = asyncio.create_task(self._flush_loop(), name="ledger-flush")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        if self._journal is not None:
            self._journal.close()
            if not self._batches:  # everything is in the database: the empty current file can go
                self._journal.path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- the request path

    async def record(self, event: UsageEvent) -> None:
        # The period is decided on arrival: a record answered within the grace hour belongs to the month it
        # started in even if its batch commits after the invoice closed (that invoice was read after a flush).
        self.record_row(
            {**row_of(event), "period": self._period(event.tenant_id, event.started_at, self.clock())}
        )

    def record_row(self, row: dict[str, Any]) -> None:
        if self._journal is None:
            raise RuntimeError("the ledger is not started")
        try:
            self._journal.append(row)
        except JournalError as exc:
            log.error("%s", exc)
            raise Unavailable(
                "usage could not be recorded (the platform's disk is full); retry later"
            ) from None
        self._buffer.append(row)
        if row["billable"] and self.on_billed is not None:
            self.on_billed(row)

    # ---------------------------------------------------------------- into the database

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except Exception:  # the database may be briefly away; the journal keeps the records meanwhile
                log.exception("usage flush failed; will retry")

    async def flush(self, tenant_id: int | None = None) -> None:
        """Commit what was recorded so far, of TENANT_ID only or of every tenant; returns once it is in the
        database (or raises, the records staying in the journal for the next try)."""
        # No await between taking the buffer and sealing it: no record can land in neither.
        if self._buffer and self._journal is not None:
            tenants = frozenset(r["tenant_id"] for r in self._buffer)
            self._batches.append(_Batch(self._journal.rotate(), self._buffer, tenants))
            self._buffer = []
        for batch in [b for b in self._batches if tenant_id is None or tenant_id in b.tenants]:
            if batch.commit is None:
                batch.commit = asyncio.create_task(self._commit(batch), name="ledger-commit")
                batch.commit.add_done_callback(_retrieved)
            # Shielded: a reader that gives up (its client went away) must not cancel a commit others await.
            await asyncio.shield(batch.commit)

    async def _commit(self, batch: _Batch) -> int:
        try:
            new = await asyncio.to_thread(self._insert, batch.rows)
        except BaseException:
            batch.commit = None  # the next flush tries again
            raise
        self._batches.remove(batch)
        batch.path.unlink(missing_ok=True)
        return new

    def _insert(self, rows: list[dict[str, Any]]) -> int:
        """Commit ROWS, skipping those already in the ledger; returns how many were new (the database says, by
        RETURNING the rows it inserted: no count before and after that a concurrent insert could upset)."""
        if not rows:
            return 0
        now = self.clock()
        with self.store.session() as s:
            values = []
            for raw in rows:
                row = raw if "tenant_id" in raw else _with_tenant_id(s, raw)
                if row is None:
                    continue
                started = datetime.fromisoformat(row["started_at"])
                # Rows journalled before rows carried their period arrived at an unknown time: now, then.
                period = row.get("period") or self._period(row["tenant_id"], started, now)
                if (row["tenant_id"], period) in self._closed:  # frozen since the row arrived
                    period = period_of(now)
                values.append({**row, "started_at": started, "period": period})
            if not values:
                return 0
            inserted = s.execute(_insert_ignoring_duplicates(self.store.engine), values)
            return len(inserted.all())

    async def add_external(self, rows: list[dict[str, Any]]) -> int:
        """Records made elsewhere (edge devices): committed before returning; duplicates (the same tenant and
        request id, already in the ledger or twice in ROWS) ignored. Returns how many were new."""
        async with contextlib.AsyncExitStack() as locks:
            for tenant_id in sorted({r["tenant_id"] for r in rows}):  # in order: two uploads never deadlock
                await locks.enter_async_context(self._tenant_locks[tenant_id])
            return await asyncio.to_thread(self._insert, rows)

    def _period(self, tenant_id: int, started: datetime, now: datetime) -> str:
        """The invoice month of a record of TENANT_ID that started at STARTED and arrived at NOW."""
        period = period_of(started)
        if (tenant_id, period) in self._closed or is_over(period, self.grace, now):
            return period_of(now)
        return period

    # ---------------------------------------------------------------- reading

    async def usage(
        self, tenant_id: int, start: datetime, end: datetime, group_by: str
    ) -> list[dict[str, Any]]:
        """Usage of tenant TENANT_ID in [START, END), grouped by function, device, day or hour (UTC)."""
        if group_by not in GROUPS:
            raise ValueError(f"group_by must be one of {', '.join(GROUPS)}")
        await self.flush(tenant_id)
        return await asyncio.to_thread(self._usage, tenant_id, start, end, group_by)

    def _usage(self, tenant_id: int, start: datetime, end: datetime, group_by: str) -> list[dict[str, Any]]:
        u = UsageRecord
        columns = (u.started_at, u.function, u.device, u.billable, u.status, u.cold_start, u.compute_us,
                   u.billed_ms, u.bytes_in, u.bytes_out)  # fmt: skip
        query = select(*columns).where(u.tenant_id == tenant_id, u.started_at >= start, u.started_at < end)
        groups: dict[str, dict[str, int]] = {}
        with self.store.session() as s:
            # Grouped here rather than in SQL: day/hour truncation differs between SQLite and PostgreSQL, and a
            # tenant's month of records streams through in well under a second.
            for r in s.execute(query.execution_options(yield_per=5000)):
                key = _group_key(r, group_by)
                g = groups.setdefault(key, dict.fromkeys(
                    ("requests", "billable_requests", "errors", "cold_starts", "compute_ms", "billed_ms",
                     "bytes_in", "bytes_out"), 0))  # fmt: skip
                g["requests"] += 1
                g["billable_requests"] += int(r.billable)
                g["errors"] += int(r.status >= 400)
                g["cold_starts"] += int(r.cold_start)
                g["compute_ms"] += r.compute_us  # summed in us, converted once below
                g["billed_ms"] += r.billed_ms
                g["bytes_in"] += r.bytes_in
                g["bytes_out"] += r.bytes_out
        rows = []
        for key in sorted(groups):
            g = groups[key]
            g["compute_ms"] = round(g["compute_ms"] / 1000, 3)  # type: ignore[assignment]  # display only
            rows.append({group_by: key, **g})
        return rows

    async def lines(self, tenant_id: int, period: str) -> list[Line]:
        await self.flush(tenant_id)
        return await asyncio.to_thread(self._lines, tenant_id, period)

    def _lines(self, tenant_id: int, period: str) -> list[Line]:
        u = UsageRecord
        query = (
            select(u.function, u.device, func.count(), func.coalesce(func.sum(u.billed_ms), 0))
            .where(u.tenant_id == tenant_id, u.period == period, u.billable.is_(True))
            .group_by(u.function, u.device)
            .order_by(u.function, u.device)
        )
        with self.store.session() as s:
            return [Line(f, d, int(n), int(ms)) for f, d, n, ms in s.execute(query)]

    def is_closed(self, tenant_id: int, period: str) -> bool:
        return (tenant_id, period) in self._closed

    async def close_period(
        self, tenant_id: int, tenant: str, period: str, build: Callable[[list[Line]], dict[str, Any]]
    ) -> dict[str, Any]:
        """Freeze the invoice of tenant TENANT_ID (named TENANT) for PERIOD, built by BUILD from its lines; from
        now on its records for PERIOD go to later months. Returns the frozen document (the earlier one if the
        period was already closed)."""
        async with self._tenant_locks[
            tenant_id
        ]:  # no upload of this tenant lands between reading and freezing
            await self.flush(tenant_id)
            with self.store.session() as s:
                existing = s.get(Invoice, (tenant_id, period))
                if existing is not None:
                    self._closed.add((tenant_id, period))
                    return existing.document
            document = build(await asyncio.to_thread(self._lines, tenant_id, period))
            with self.store.session() as s:
                s.add(Invoice(tenant_id=tenant_id, tenant=tenant, period=period, document=document,
                              closed_at=self.clock()))  # fmt: skip
            self._closed.add((tenant_id, period))
            return document


def _retrieved(task: asyncio.Task[int]) -> None:
    """Mark a commit's failure as seen: whoever awaited it got it (and the flush loop logs it), so asyncio need not
    warn that it was never retrieved when every awaiter had gone."""
    if not task.cancelled():
        task.exception()


def _with_tenant_id(s: Session, row: dict[str, Any]) -> dict[str, Any] | None:
    """A journal row written before records carried tenant ids (migration 0005), replayed after the upgrade:
    the tenant of that name, which existed when it was written (or, deleted since, the newest of that name)."""
    tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == row["tenant"]))
    if tenant_id is None:
        tenant_id = s.scalar(
            select(DeletedTenant.id)
            .where(DeletedTenant.name == row["tenant"])
            .order_by(DeletedTenant.id.desc())
        )
    if tenant_id is None:
        log.error("usage record %s names tenant %r, which this platform never had: not billed",
                  row["request_id"], row["tenant"])  # fmt: skip
        return None
    return {**row, "tenant_id": tenant_id}


def _group_key(r: Any, group_by: str) -> str:
    if group_by == "function":
        return str(r.function)
    if group_by == "device":
        return str(r.device)
    started: datetime = r.started_at
    return started.strftime("%Y-%m-%d") if group_by == "day" else started.strftime("%Y-%m-%dT%H:00Z")


def _insert_ignoring_duplicates(engine: Engine) -> Any:
    """INSERT ... ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING request_id: the rows it returns are the
    new ones (SQLite >= 3.35 and PostgreSQL both return only what they inserted)."""
    key = ["tenant_id", "request_id"]
    new = UsageRecord.request_id
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(UsageRecord).on_conflict_do_nothing(index_elements=key).returning(new)
    if engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(UsageRecord).on_conflict_do_nothing(index_elements=key).returning(new)
    raise NotImplementedError(f"the usage ledger supports SQLite and PostgreSQL, not {engine.dialect.name}")
