"""network VNI and MTU: nat and isolated networks span a pool's hosts as one VXLAN segment each

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

FIRST_VNI = 10000


def upgrade() -> None:
    with op.batch_alter_table("networks") as batch:
        batch.add_column(sa.Column("vni", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("mtu", sa.Integer(), nullable=True))
        batch.create_unique_constraint("uq_networks_vni", ["vni"])
    # Networks made before overlays get their VNI now, so they span the pool like new ones.
    networks = sa.table(
        "networks",
        sa.column("id", sa.String),
        sa.column("mode", sa.String),
        sa.column("vni", sa.Integer),
        sa.column("created_at", sa.DateTime),
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(networks.c.id).where(networks.c.mode != "bridge").order_by(networks.c.created_at, networks.c.id)
    ).all()
    for offset, (network_id,) in enumerate(rows):
        bind.execute(networks.update().where(networks.c.id == network_id).values(vni=FIRST_VNI + offset))


def downgrade() -> None:
    with op.batch_alter_table("networks") as batch:
        batch.drop_constraint("uq_networks_vni", type_="unique")
        batch.drop_column("mtu")
        batch.drop_column("vni")
