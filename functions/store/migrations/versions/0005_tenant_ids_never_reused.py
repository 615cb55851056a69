"""tenant ids never reused; usage, invoices and audit entries kept by tenant id; deleted tenants

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 10:00:00

Before this, usage records, invoices and audit entries named their tenant, so a tenant created under a deleted
one's name inherited its history; and SQLite gave a deleted newest tenant's id (and worker uid) to the next one.

Records written before this carry only a name. Each is given the id of the live tenant of that name if that
tenant already existed when the record was made; the rest belong to tenants deleted before this migration,
whose ids are gone: each such name becomes one deleted tenant with a new id (several tenants deleted under the
same name cannot be told apart and share it), so that every usage record and invoice has an id, and none of
them is handed to the live tenant.
"""

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_OWNER = "SELECT t.id FROM tenants t WHERE t.name = {table}.tenant AND t.created_at <= {table}.{at}"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":  # the table is copied: Store.migrate turns foreign keys off meanwhile
        with op.batch_alter_table("tenants", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass
    op.create_table(
        "deleted_tenants",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("plan", sa.String(length=63), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=True),
        sa.Column("deleted_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_deleted_tenants_name", "deleted_tenants", ["name"])

    with op.batch_alter_table("usage_records") as batch_op:
        batch_op.add_column(sa.Column("tenant_id", sa.Integer(), nullable=True))
    with op.batch_alter_table("audit_log") as batch_op:
        batch_op.add_column(sa.Column("tenant_id", sa.Integer(), nullable=True))
    op.execute(
        f"UPDATE usage_records SET tenant_id = ({_OWNER.format(table='usage_records', at='started_at')})"
    )
    op.execute(
        f"UPDATE audit_log SET tenant_id = ({_OWNER.format(table='audit_log', at='at')}) WHERE tenant IS NOT NULL"
    )
    invoices = _owned_invoices(bind)

    orphans = _names(bind, "SELECT DISTINCT tenant FROM usage_records WHERE tenant_id IS NULL")
    orphans |= {i["tenant"] for i in invoices if i["tenant_id"] is None}
    # An audit entry that succeeded names a tenant that existed (a refused create may name one that never did).
    orphans |= _names(bind, "SELECT DISTINCT tenant FROM audit_log "
                            "WHERE tenant_id IS NULL AND tenant IS NOT NULL AND outcome = 'ok'")  # fmt: skip
    deleted = sa.table("deleted_tenants", sa.column("id", sa.Integer), sa.column("name", sa.String),
                       sa.column("plan", sa.String))  # fmt: skip
    for name in sorted(orphans):
        tenant_id = _new_tenant_id(bind)
        bind.execute(sa.insert(deleted).values(id=tenant_id, name=name, plan="default"))  # its plan is gone
        for records in ("usage_records", "audit_log"):
            bind.execute(
                sa.text(f"UPDATE {records} SET tenant_id = :id WHERE tenant = :name AND tenant_id IS NULL"),
                {"id": tenant_id, "name": name},
            )
        for invoice in invoices:
            if invoice["tenant"] == name and invoice["tenant_id"] is None:
                invoice["tenant_id"] = tenant_id

    op.drop_index("ix_usage_tenant_started", "usage_records")
    op.drop_index("ix_usage_tenant_period", "usage_records")
    with op.batch_alter_table("usage_records") as batch_op:
        batch_op.alter_column("tenant_id", existing_type=sa.Integer(), nullable=False)
    op.create_index("ix_usage_tenant_id_period", "usage_records", ["tenant_id", "period"])
    op.create_index("ix_usage_tenant_id_started", "usage_records", ["tenant_id", "started_at"])
    op.create_index("ix_audit_tenant_id_at", "audit_log", ["tenant_id", "at"])

    # Invoices change their primary key: a small table (a row per tenant and month), rewritten whole.
    op.drop_table("invoices")
    table = op.create_table(
        "invoices",
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("closed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "period"),
    )
    if invoices:
        op.bulk_insert(table, invoices)


def _names(bind: Any, query: str) -> set[str]:
    return {row[0] for row in bind.execute(sa.text(query))}


def _owned_invoices(bind: Any) -> list[dict[str, Any]]:
    """Every invoice, with the id of the live tenant of its name if that tenant existed before its month ended."""
    invoices = sa.table("invoices", sa.column("tenant", sa.String), sa.column("period", sa.String),
                        sa.column("document", sa.JSON), sa.column("closed_at", sa.DateTime))  # fmt: skip
    tenants = sa.table("tenants", sa.column("id", sa.Integer), sa.column("name", sa.String),
                       sa.column("created_at", sa.DateTime))  # fmt: skip
    created = {name: (tenant_id, at) for tenant_id, name, at in bind.execute(sa.select(tenants))}
    rows = []
    for row in bind.execute(sa.select(invoices)).mappings():
        year, month = map(int, row["period"].split("-"))
        month_end = datetime(year + month // 12, month % 12 + 1, 1)  # naive UTC, as stored
        owner = created.get(row["tenant"])
        tenant_id = owner[0] if owner is not None and owner[1] < month_end else None
        rows.append({**row, "tenant_id": tenant_id})
    return rows


def _new_tenant_id(bind: Any) -> int:
    """An id no tenant ever had nor will have: taken from the tenants table's own counter."""
    top = int(bind.execute(sa.text("SELECT coalesce(max(id), 0) FROM tenants")).scalar_one())
    if bind.dialect.name == "postgresql":
        sequence = "pg_get_serial_sequence('tenants', 'id')"
        new = int(bind.execute(sa.text(f"SELECT nextval({sequence})")).scalar_one())
        if new <= top:  # only if ids were ever inserted by hand, past the sequence
            new = top + 1
            bind.execute(sa.text(f"SELECT setval({sequence}, :n)"), {"n": new})
        return new
    # SQLite: sqlite_sequence holds the largest id AUTOINCREMENT has handed out (no row before the first).
    seq = bind.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'tenants'")).scalar()
    new = max(int(seq or 0), top) + 1
    if seq is None:
        bind.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('tenants', :n)"), {"n": new})
    else:
        bind.execute(sa.text("UPDATE sqlite_sequence SET seq = :n WHERE name = 'tenants'"), {"n": new})
    return new


def downgrade() -> None:
    bind = op.get_bind()
    invoices = sa.table("invoices", sa.column("tenant_id", sa.Integer), sa.column("tenant", sa.String),
                        sa.column("period", sa.String), sa.column("document", sa.JSON),
                        sa.column("closed_at", sa.DateTime))  # fmt: skip
    by_name = {}  # keyed by name again: of two tenants of one name, the newer one's invoice is kept
    for row in bind.execute(sa.select(invoices).order_by(invoices.c.tenant_id)).mappings():
        by_name[row["tenant"], row["period"]] = {k: v for k, v in row.items() if k != "tenant_id"}
    op.drop_table("invoices")
    table = op.create_table(
        "invoices",
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("closed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "period"),
    )
    if by_name:
        op.bulk_insert(table, list(by_name.values()))
    op.drop_index("ix_audit_tenant_id_at", "audit_log")
    op.drop_index("ix_usage_tenant_id_started", "usage_records")
    op.drop_index("ix_usage_tenant_id_period", "usage_records")
    with op.batch_alter_table("audit_log") as batch_op:
        batch_op.drop_column("tenant_id")
    with op.batch_alter_table("usage_records") as batch_op:
        batch_op.drop_column("tenant_id")
    op.create_index("ix_usage_tenant_period", "usage_records", ["tenant", "period"])
    op.create_index("ix_usage_tenant_started", "usage_records", ["tenant", "started_at"])
    op.drop_index("ix_deleted_tenants_name", "deleted_tenants")
    op.drop_table("deleted_tenants")
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table("tenants", recreate="always", table_kwargs={"sqlite_autoincrement": False}):
            pass
