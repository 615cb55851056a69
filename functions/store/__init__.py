"""Durable state: SQLite by default, any SQLAlchemy URL (PostgreSQL) when configured."""

from functions.store.db import Store
from functions.store.models import ApiKey, Function, Tenant

__all__ = ["ApiKey", "Function", "Store", "Tenant"]
