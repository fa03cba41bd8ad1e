"""usage history and optimization plans: usage points per VM and per host with roll-ups, stored plans, standby

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("standby", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "usage_points",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("resource_id", sa.String(length=63), nullable=False),
        sa.Column("host", sa.String(length=63), nullable=True),
        sa.Column("resolution", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("cpu", sa.Float(), nullable=False),
        sa.Column("memory", sa.BigInteger(), nullable=False),
        sa.Column("balloon", sa.BigInteger(), nullable=True),
        sa.Column("disk_read", sa.Float(), nullable=False),
        sa.Column("disk_write", sa.Float(), nullable=False),
        sa.Column("net_rx", sa.Float(), nullable=False),
        sa.Column("net_tx", sa.Float(), nullable=False),
        sa.Column("load", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_usage_points_lookup", "usage_points", ["kind", "resource_id", "resolution", "at"])
    op.create_index("ix_usage_points_host", "usage_points", ["host", "resolution", "at"])
    op.create_table(
        "plans",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("moves", sa.JSON(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("plans")
    op.drop_index("ix_usage_points_host", table_name="usage_points")
    op.drop_index("ix_usage_points_lookup", table_name="usage_points")
    op.drop_table("usage_points")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("standby")
