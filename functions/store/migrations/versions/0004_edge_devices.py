"""edge devices: the hashed device keys of exported edge bundles

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 11:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "edge_devices",
        sa.Column("bundle_id", sa.String(length=16), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("function", sa.String(length=63), nullable=False),
        sa.Column("target", sa.String(length=8), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("lite_version", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("last_upload_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("bundle_id"),
    )
    op.create_index("ix_edge_devices_tenant_id", "edge_devices", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_edge_devices_tenant_id", "edge_devices")
    op.drop_table("edge_devices")
