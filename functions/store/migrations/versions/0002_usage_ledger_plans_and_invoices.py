"""usage ledger, plans (prices) and frozen invoices

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 11:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.add_column(sa.Column("plan", sa.String(length=63), nullable=False, server_default="default"))
    op.create_table(
        "usage_records",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column("function", sa.String(length=63), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("duration_us", sa.BigInteger(), nullable=False),
        sa.Column("compute_us", sa.BigInteger(), nullable=False),
        sa.Column("billed_ms", sa.BigInteger(), nullable=False),
        sa.Column("device", sa.String(length=8), nullable=False),
        sa.Column("cold_start", sa.Boolean(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("billable", sa.Boolean(), nullable=False),
        sa.Column("bytes_in", sa.BigInteger(), nullable=False),
        sa.Column("bytes_out", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_index("ix_usage_tenant_period", "usage_records", ["tenant", "period"])
    op.create_index("ix_usage_tenant_started", "usage_records", ["tenant", "started_at"])
    op.create_table(
        "plans",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("prices", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "invoices",
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("closed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "period"),
    )


def downgrade() -> None:
    op.drop_table("invoices")
    op.drop_table("plans")
    op.drop_index("ix_usage_tenant_started", "usage_records")
    op.drop_index("ix_usage_tenant_period", "usage_records")
    op.drop_table("usage_records")
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.drop_column("plan")
