"""Tables of the platform's durable state (SQLAlchemy 2). Migrations in ``migrations/`` create them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite keeps no zone), always handed out zone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"
    # Without AUTOINCREMENT SQLite hands out max(id) + 1, so deleting the newest tenant would give its id (and
    # with it its worker uid, settings.tenant_uid_base + id) to the next one. PostgreSQL's sequence never reuses.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    plan: Mapped[str] = mapped_column(String(63), default="default")  # prices (and, later, quotas)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeletedTenant(Base):
    """A tenant that was deleted, under its id (never given to another tenant): its usage, invoices and audit
    entries are kept by that id, and the admin reads them through it."""

    __tablename__ = "deleted_tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # the tenant's id
    name: Mapped[str] = mapped_column(String(63), index=True)  # not unique: a name may be deleted many times
    plan: Mapped[str] = mapped_column(String(63))  # the plan it had: prices its still-open invoice
    # Both None for a tenant deleted before migration 0005, found only through its records (see there).
    created_at: Mapped[datetime | None] = mapped_column(default=None)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public part of the key
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    secret_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the secret part, hex
    scopes: Mapped[str] = mapped_column(String(100))  # comma-separated: admin | manage,invoke
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class Function(Base):
    __tablename__ = "functions"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    status: Mapped[str] = mapped_column(String(16))  # deploying | ready | failed
    error: Mapped[str | None] = mapped_column(Text, default=None)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    version: Mapped[str] = mapped_column(String(32))  # one per upload; names the artifact folder
    artifact_dir: Mapped[str] = mapped_column(String(500))  # relative to the data dir
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_request_at: Mapped[datetime | None] = mapped_column(default=None)


class UsageRecord(Base):
    """One request that reached a function: the ledger's row, written once (idempotent by tenant and request id:
    a request id is whatever its sender picked, so it is unique only within a tenant; migration 0006)."""

    __tablename__ = "usage_records"
    __table_args__ = (
        PrimaryKeyConstraint("tenant_id", "request_id", name="usage_records_pkey"),
        Index("ix_usage_tenant_id_period", "tenant_id", "period"),
        Index("ix_usage_tenant_id_started", "tenant_id", "started_at"),
    )

    request_id: Mapped[str] = mapped_column(String(64))
    # By id, not a foreign key: billing history outlives the tenant row, and a later tenant of the same name
    # (a new id) must not see it.
    tenant_id: Mapped[int] = mapped_column(Integer)
    tenant: Mapped[str] = mapped_column(String(63))  # the name it had, for people
    function: Mapped[str] = mapped_column(String(63))
    period: Mapped[str] = mapped_column(String(7))  # "YYYY-MM" of the invoice it belongs to
    started_at: Mapped[datetime] = mapped_column()
    duration_us: Mapped[int] = mapped_column(BigInteger)
    compute_us: Mapped[int] = mapped_column(BigInteger)  # as reported, to the nearest microsecond
    billed_ms: Mapped[int] = mapped_column(BigInteger)  # reported compute rounded up to ms; 0 if not billed
    device: Mapped[str] = mapped_column(String(8))  # gpu | cpu | lite | edge
    cold_start: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[int] = mapped_column(Integer)
    billable: Mapped[bool] = mapped_column(Boolean)
    bytes_in: Mapped[int] = mapped_column(BigInteger)
    bytes_out: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16), default="gateway")  # gateway | edge:<bundle id>


class Plan(Base):
    __tablename__ = "plans"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    prices: Mapped[dict[str, Any]] = mapped_column(default=dict)  # functions.billing.pricing.Prices
    limits: Mapped[dict[str, Any]] = mapped_column(default=dict)  # functions.plans.Limits
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Invoice(Base):
    """A closed month's invoice, frozen: it never changes once written."""

    __tablename__ = "invoices"

    tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)  # as UsageRecord.tenant_id
    tenant: Mapped[str] = mapped_column(String(63))
    period: Mapped[str] = mapped_column(String(7), primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column()
    closed_at: Mapped[datetime] = mapped_column()


class AuditEntry(Base):
    """One change to the platform: who (key id), what (action, target), to which tenant, and how it ended."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_tenant_at", "tenant", "at"),
        Index("ix_audit_tenant_id_at", "tenant_id", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column()
    actor: Mapped[str] = mapped_column(String(32))  # key id, or "system" for the platform's own policy
    tenant: Mapped[str | None] = mapped_column(String(63))  # the name, for people and for ?tenant=
    # Which tenant of that name (as UsageRecord.tenant_id); None for changes to no tenant, or to one that never
    # existed (a refused create).
    tenant_id: Mapped[int | None] = mapped_column(Integer, default=None)
    action: Mapped[str] = mapped_column(String(40))  # e.g. function.create, key.revoke, function.sleep
    target: Mapped[str] = mapped_column(String(200), default="")
    outcome: Mapped[str] = mapped_column(String(16))  # ok | failed | refused
    detail: Mapped[str] = mapped_column(Text, default="")


class EdgeDevice(Base):
    """An exported edge bundle's device key (only its hash): it authenticates the bundle's usage uploads."""

    __tablename__ = "edge_devices"

    bundle_id: Mapped[str] = mapped_column(
        String(16), primary_key=True
    )  # also in the key: pfe_<bundle id>_...
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    function: Mapped[str] = mapped_column(String(63))  # by name: its usage is billed to it after a redeploy
    target: Mapped[str] = mapped_column(String(8))  # x86 | arm
    secret_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the key's secret part, hex
    lite_version: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_upload_at: Mapped[datetime | None] = mapped_column(default=None)
