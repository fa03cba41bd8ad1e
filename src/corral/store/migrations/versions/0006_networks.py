"""networks, network ports and port forwards

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "networks",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("subnet", sa.String(length=64), nullable=True),
        sa.Column("gateway", sa.String(length=64), nullable=True),
        sa.Column("dhcp", sa.Boolean(), nullable=False),
        sa.Column("uplink", sa.String(length=15), nullable=True),
        sa.Column("bridge", sa.String(length=15), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("status_message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project", "name"),
    )
    op.create_table(
        "network_ports",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("network_id", sa.String(length=32), nullable=False),
        sa.Column("vm_id", sa.String(length=32), nullable=False),
        sa.Column("nic_index", sa.Integer(), nullable=False),
        sa.Column("mac", sa.String(length=17), nullable=False),
        sa.Column("ip", sa.String(length=64), nullable=True),
        sa.Column("tap", sa.String(length=15), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["network_id"], ["networks.id"]),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("network_id", "mac"),
        sa.UniqueConstraint("network_id", "ip"),
        sa.UniqueConstraint("vm_id", "nic_index"),
    )
    op.create_table(
        "port_forwards",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("vm_id", sa.String(length=32), nullable=False),
        sa.Column("host", sa.String(length=63), nullable=True),
        sa.Column("nic_index", sa.Integer(), nullable=False),
        sa.Column("protocol", sa.String(length=3), nullable=False),
        sa.Column("host_port", sa.Integer(), nullable=False),
        sa.Column("guest_port", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("host", "protocol", "host_port"),
    )


def downgrade() -> None:
    op.drop_table("port_forwards")
    op.drop_table("network_ports")
    op.drop_table("networks")
