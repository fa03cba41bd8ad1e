"""a pool of hosts: drained hosts, storage overcommit, reported usage, placement groups, lookup indexes

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("drained", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("storage_overcommit", sa.Float(), nullable=False, server_default="4.0"))
        batch_op.add_column(sa.Column("usage", sa.JSON(), nullable=False, server_default="{}"))
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("placement_group", sa.String(length=63), nullable=True))
        batch_op.add_column(sa.Column("placement_policy", sa.String(length=16), nullable=True))
        batch_op.create_index("ix_vms_host", ["host"])
        batch_op.create_index("ix_vms_placement_group", ["project", "placement_group"])
    with op.batch_alter_table("volumes", schema=None) as batch_op:
        batch_op.create_index("ix_volumes_host", ["host"])
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_host_state", ["host", "state"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_host_state")
    with op.batch_alter_table("volumes", schema=None) as batch_op:
        batch_op.drop_index("ix_volumes_host")
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_index("ix_vms_placement_group")
        batch_op.drop_index("ix_vms_host")
        batch_op.drop_column("placement_policy")
        batch_op.drop_column("placement_group")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("usage")
        batch_op.drop_column("storage_overcommit")
        batch_op.drop_column("drained")
