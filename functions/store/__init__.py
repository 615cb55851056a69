"""Durable state: SQLite by default, any SQLAlchemy URL (PostgreSQL) when configured."""

from functions.store.db import Store
from functions.store.models import (
    ApiKey,
    AuditEntry,
    DeletedTenant,
    EdgeDevice,
    Function,
    Invoice,
    Plan,
    Tenant,
    UsageRecord,
)

__all__ = [
    "ApiKey",
    "AuditEntry",
    "DeletedTenant",
    "EdgeDevice",
    "Function",
    "Invoice",
    "Plan",
    "Store",
    "Tenant",
    "UsageRecord",
]
