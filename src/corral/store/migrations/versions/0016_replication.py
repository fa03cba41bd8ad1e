"""disk replication to partner hosts: one row per replicated VM, with its partner, interval and last copy

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("vm_name", sa.String(length=63), nullable=False),
        sa.Column("vm_id", sa.String(length=32), nullable=False),
        sa.Column("partner", sa.String(length=63), nullable=False),
        sa.Column("every", sa.Float(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("bitmap", sa.String(length=63), nullable=True),
        sa.Column("disks", sa.JSON(), nullable=False),
        sa.Column("copies", sa.Integer(), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_kind", sa.String(length=16), nullable=True),
        sa.Column("last_consistent", sa.Boolean(), nullable=True),
        sa.Column("last_bytes", sa.BigInteger(), nullable=True),
        sa.Column("last_seconds", sa.Float(), nullable=True),
        sa.Column("last_job_id", sa.String(length=32), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("vm_id"),
        sa.UniqueConstraint("project", "vm_name"),
    )


def downgrade() -> None:
    op.drop_table("replicas")
