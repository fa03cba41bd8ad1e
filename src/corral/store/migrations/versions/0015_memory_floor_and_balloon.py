"""memory floor for automatic ballooning: the least memory the agent's balloon control leaves a VM

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: the default floor (corral.spec.vm.memory_floor), which follows the VM's memory as it is resized.
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("min_memory", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("min_memory")
