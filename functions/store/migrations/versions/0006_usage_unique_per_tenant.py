"""usage records unique per tenant: (tenant_id, request_id), not request_id alone

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 22:40:00

A request id is an idempotency key its sender picks (an edge device picks its own), so one key for all tenants
let a record of one tenant be dropped as a "duplicate" of another tenant's (billed to no one), and let anyone who
saw a request id suppress that record. Every existing row keeps its place: ids unique alone are unique per tenant.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

NEW_KEY = ["tenant_id", "request_id"]  # tenant first: the ledger looks records up by tenant


def _usage_records(key: list[str]) -> sa.Table:
    """The table as 0005 left it, with primary key KEY: what SQLite's copy is made from (reflecting it instead
    would keep request_id's own primary-key flag, which SQLAlchemy warns contradicts the new key)."""
    big = sa.BigInteger()
    return sa.Table(
        "usage_records",
        sa.MetaData(),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column("function", sa.String(length=63), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("duration_us", big, nullable=False),
        sa.Column("compute_us", big, nullable=False),
        sa.Column("billed_ms", big, nullable=False),
        sa.Column("device", sa.String(length=8), nullable=False),
        sa.Column("cold_start", sa.Boolean(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("billable", sa.Boolean(), nullable=False),
        sa.Column("bytes_in", big, nullable=False),
        sa.Column("bytes_out", big, nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint(*key, name="usage_records_pkey"),
        sa.Index("ix_usage_tenant_id_period", "tenant_id", "period"),
        sa.Index("ix_usage_tenant_id_started", "tenant_id", "started_at"),
    )


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite cannot change a primary key in place: batch mode copies the table (indexes too) with the new key.
        with op.batch_alter_table("usage_records", recreate="always", copy_from=_usage_records(NEW_KEY)):
            pass
    else:
        op.drop_constraint(
            "usage_records_pkey", "usage_records", type_="primary"
        )  # PostgreSQL's default name
        op.create_primary_key("usage_records_pkey", "usage_records", NEW_KEY)


def downgrade() -> None:
    bind = op.get_bind()
    shared = bind.exec_driver_sql(
        "SELECT request_id FROM usage_records GROUP BY request_id HAVING count(*) > 1 LIMIT 5"
    ).all()
    if shared:  # two tenants' records of one id: the old key cannot hold both, and dropping one loses usage
        raise RuntimeError(
            f"cannot downgrade below 0006: request ids {[r[0] for r in shared]} belong to several tenants' "
            "records; the old schema could keep only one of each"
        )
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table(
            "usage_records", recreate="always", copy_from=_usage_records(["request_id"])
        ):
            pass
    else:
        op.drop_constraint("usage_records_pkey", "usage_records", type_="primary")
        op.create_primary_key("usage_records_pkey", "usage_records", ["request_id"])
