"""backup schedules and verification results: periodic backups with retention, and what `backup verify` found

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backup_schedules",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("vm_name", sa.String(length=63), nullable=False),
        sa.Column("vm_id", sa.String(length=32), nullable=False),
        sa.Column("every", sa.Float(), nullable=False),
        sa.Column("keep_last", sa.Integer(), nullable=False),
        sa.Column("keep_daily", sa.Integer(), nullable=False),
        sa.Column("keep_weekly", sa.Integer(), nullable=False),
        sa.Column("incremental_every", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_job_id", sa.String(length=32), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project", "vm_name"),
    )
    with op.batch_alter_table("backups") as batch:
        batch.add_column(sa.Column("schedule_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("backup_store", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("verify_state", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("verify_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backups") as batch:
        batch.drop_column("verify_error")
        batch.drop_column("verified_at")
        batch.drop_column("verify_state")
        batch.drop_column("backup_store")
        batch.drop_column("schedule_id")
    op.drop_table("backup_schedules")
